"""The probe's per-step bookkeeping of one call site (one layer of the signal path), and the
small pure helpers the hooks and the statistics share."""

from __future__ import annotations

import math
import warnings
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
                 "alive", "idx", "idx_n", "handles")

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
        # (tensor, hook handle) of leaf outputs (a module returning a parameter): a tensor
        # hook lives as long as its tensor, so it is removed when the step ends (else one
        # more every step), and a tensor gets one (its gradient arrives once per backward)
        self.handles: list[tuple[torch.Tensor, Any]] = []

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
        for _, h in self.handles:
            h.remove()
        self.handles = []


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



#: ``seen[0]`` of :func:`repeated_pass` once an output's norm is marked not measured.
REPEAT_MARK = -2


def hook_leaf(s: _Site, t: torch.Tensor, hook: Any) -> None:
    """Hook the gradient of a leaf output ``t`` of site ``s`` for this step (once)."""
    if not any(x is t for x, _ in s.handles):
        s.handles.append((t, t.register_hook(hook)))


def repeated_pass(seen: list[int], task: int, entries: tuple[tuple[Any, list | None], ...]) -> bool:
    """Whether an output's gradients in this backward pass (graph ``task``) are left out.

    Several passes through one graph in a step: dL/dh is then the SUM of their gradients,
    which per-pass norms cannot give (pooled like micro-batches', they gave
    sqrt(||g1||^2 + ||g2||^2), silently wrong). A pass run with ``create_graph`` (a gradient
    penalty's or MAML's ``autograd.grad``) computes a gradient that a later pass
    differentiates: that later pass delivers the whole dL/dh, so it replaces the earlier
    entry (exact). After a plain pass (``a.backward(retain_graph=True); b.backward()``) the
    output's norm is NaN (not measured) for the step, with a warning; parameter gradients,
    which ``.grad`` sums, stay exact.

    Args:
        seen: Per hook registration: ``[task of the last pass]`` plus, when that pass made a
            graph, the index its entry got in each store (-1: none).
        task: The current graph task's id (-1: unknown; nothing is detected).
        entries: ``(gradient, store)`` pairs this hook appends to (either may be None).
    """
    last = seen[0]
    if last == REPEAT_MARK:
        return True
    if last >= 0 and last != task:
        if len(seen) == 1:  # a plain pass before: the gradients add
            seen[0] = REPEAT_MARK
            for _, st in entries:
                if st is not None:
                    st.append((math.nan, 0.0))
            warnings.warn("signalprop: several backward passes through the same outputs in one "
                          "step: their gradients add, which per-pass norms cannot measure; "
                          "out_grad_norm of those layers is NaN for the step (parameter "
                          "gradient norms are exact)", stacklevel=4)
            return True
        for (_, st), i in zip(entries, seen[1:], strict=False):
            if st is not None and 0 <= i < len(st):
                st[i] = tuple(None if v is None else torch.zeros_like(v)
                              if isinstance(v, torch.Tensor) else 0.0 for v in st[i])
    seen[0] = task
    del seen[1:]
    if torch.is_grad_enabled():  # (inside backward: the pass's create_graph)
        seen += [len(st) if st is not None and g is not None else -1 for g, st in entries]
    return False


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
