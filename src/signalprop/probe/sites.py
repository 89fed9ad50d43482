"""The probe's per-step bookkeeping of one call site (one layer of the signal path), and the
small pure helpers the hooks and the statistics share."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from signalprop import stats
from signalprop.record import TIME_PREFIX
from signalprop.vocab.norms import NORM_CLASSES

_Metrics = list[tuple[str, str]]  # (layer, metric) names matching a flat value vector

#: At most this many call sites per module and forward pass; later calls share the last site
#: (a module called in a long Python loop is better described as a recurrent cell).
MAX_SITES = 64

_CELLS = (nn.RNNCellBase,)

_NORMS = NORM_CLASSES  # the norm vocabulary's module classes


def time_metric(t: int) -> str:
    """Metric name of ||dL/dh_t|| at time step ``t`` of a recurrent layer."""
    return f"{TIME_PREFIX}{t}"


class _Site:
    """One call site of a watched module: one layer of the signal path."""

    __slots__ = ("name", "module", "type", "kind", "call", "loop", "outs", "ins", "versions",
                 "ograds", "tgrads", "used", "unchecked", "gates", "depth", "conv", "shape", "numel",
                 "alive", "idx", "idx_n")

    def __init__(self, name: str, module: str, type: str, kind: str | None, call: int,
                 loop: bool) -> None:
        self.name, self.module, self.type, self.kind = name, module, type, kind
        self.call, self.loop = call, loop
        self.outs: list[torch.Tensor] = []
        self.ins: list[torch.Tensor] = []
        self.versions: list[int] = []
        # (||dL/dh||, NaN/Inf count) of each backward call this step, computed inside the
        # gradient hook. Keeping the gradient tensors alive until the end of the step instead
        # costs ~3x more (the allocator can no longer reuse their buffers; measured).
        self.ograds: list[tuple[Any, Any]] = []
        self.tgrads: list[list[tuple[Any, Any]]] = []  # per time step (recurrent cells)
        self.used = False
        self.unchecked: str | None = None
        self.gates: dict[str, list[torch.Tensor]] = {}  # recurrent gate values this step
        self.shape: tuple[int, ...] | None = None  # output shape without the batch dimension
        self.numel = 0  # values output this step (a sample holds at most max_forward_samples)
        self.alive: list[torch.Tensor] = []  # rectifiers: units active in the batch, per call
        self.depth = 0  # position on the signal path
        self.conv = False  # output of a convolutional stack: channel-first units
        self.idx: torch.Tensor | None = None  # the forward sample's flat indices ...
        self.idx_n: tuple[int, int] = (-1, -1)  # ... for outputs of this (size, device index)

    @property
    def needs_input(self) -> bool:
        k = self.kind
        return k is not None and k in stats.SATURATING and not stats.SATURATING[k][0]

    def clear(self) -> None:
        self.outs, self.ins, self.versions = [], [], []
        self.shape, self.numel, self.alive = None, 0, []
        self.ograds = []
        self.tgrads = []
        self.gates = {}
        self.used = False


def _pool(g: list[tuple[Any, Any]]) -> tuple[Any, Any]:
    """One (norm, bad count) from several backward calls (micro-batches, time steps): the
    norm of all of them together."""
    if len(g) == 1:
        return g[0]
    if all(type(n) is float for n, _ in g):
        return math.hypot(*(n for n, _ in g)), sum(b for _, b in g)
    # (a mix: a CPU pass whose gradients require grad, create_graph=True for a gradient
    # penalty, gives device norms; the other passes host floats)
    dev = next(n.device for n, _ in g if isinstance(n, torch.Tensor))
    bads = [b for _, b in g]
    return (torch.linalg.vector_norm(torch.stack([torch.as_tensor(n, dtype=torch.float64,
                                                                  device=dev) for n, _ in g])),
            None if any(b is None for b in bads)
            else torch.stack([torch.as_tensor(b) for b in bads]).sum())



def _active_units(h: torch.Tensor, channels: bool) -> torch.Tensor:
    """Which units of a rectifier's output are active for some example: [units] bool. A unit
    is a feature (the last dim, over batch and sequence positions) or, for convolutional maps
    (``channels``), a channel (dim 1, over batch and all positions)."""
    if h.dim() <= 1:
        return (h.amax() > 0).reshape(1)
    if h.dim() == 2:
        return h.amax(dim=0) > 0
    if channels:
        return h.amax(dim=(0, *range(2, h.dim()))) > 0
    return h.amax(dim=tuple(range(h.dim() - 1))) > 0
