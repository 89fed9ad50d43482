"""What the diagnosis knows about the model, read from a record's layer metadata.

Rules number layers the way a reader counts them: "layer k" is the k-th *weight layer*
(Linear/Conv/... : a module owning a parameter of 2 or more dimensions) in forward order, and an
activation or norm module belongs to the weight layer that precedes it ("block" k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from signalprop import stats
from signalprop._format import fmt_number
from signalprop.record import LayerInfo, Record

_BN_TYPES = ("BatchNorm",)
_OTHER_NORM_TYPES = ("LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "LocalResponseNorm")
_ADAPTIVE = ("adam", "adamw", "rmsprop", "adagrad", "adadelta", "adamax", "nadam", "radam",
             "smorms3", "rprop", "vsgd")


@dataclass
class Context:
    """Model facts the rules and the prescription ranking use.

    Attributes:
        weight_layers: Module names of weight layers, forward order.
        weight_params: Weight layer module -> its weight parameter name.
        block: Any layer or parameter name -> 1-based weight-layer index (0: before the first).
        activations: Activation module name -> activation kind.
        has_bn: A BatchNorm module is present.
        has_other_norm: A LayerNorm/GroupNorm/... module is present.
        residual: Whether the model has skip connections (from ``record.meta["residual"]``;
            ``None`` when unknown: leaf-module hooks cannot see additions).
        optimizer: Lower-case optimiser name from ``record.meta`` or ``None``.
        sigma_w2: Median over the hidden weight layers (all but the last) of the mean-field
            weight scale sigma_w^2 = fan_in Var(W) ~= ||W||_F^2 / fan_out at the first recorded
            step (Poole et al. 2016 notation); NaN when weight norms were not recorded.
        norm_placement: ``"pre"``/``"post"`` layer norm of transformer layers, else ``None``.
        transformer: Attention modules are present (``None``: unknown).
        recurrent: RNN/LSTM/GRU modules are present (``None``: unknown).
        sequential_blocks: The model has an ``nn.Sequential`` of (layer, activation) blocks,
            which the structural remedies rewrite (``None``: unknown).
        pre_ln_switchable: Post-LN ``torch.nn.Transformer*Layer`` modules exist (the
            ``pre_ln`` remedy applies).
        activation_modules: The model has activation modules that ``relu`` /
            ``scaled_activation`` can swap (``None``: unknown).
        example_input: An example input can be taken from the batches (what data-driven inits
            such as LSUV need; not with a ``step_fn``); ``None``: unknown.
        residual_blocks: Blocks the probe saw add their own input to their output, forward
            order (their ``in_grad_norm`` is the residual stream); empty when none was seen.
        recurrent_layers: Layers with a per-time-step gradient profile, forward order.
        unchecked: Layer -> why a statistic of it could not be measured (from the probe).

    The architecture facts come from ``record.meta`` (see
    :func:`signalprop.diagnosis.architecture.architecture_facts`).
    """

    weight_layers: list[str] = field(default_factory=list)
    weight_params: dict[str, str] = field(default_factory=dict)
    block: dict[str, int] = field(default_factory=dict)
    activations: dict[str, str] = field(default_factory=dict)
    has_bn: bool = False
    has_other_norm: bool = False
    residual: bool | None = None
    optimizer: str | None = None
    sigma_w2: float = float("nan")
    norm_placement: str | None = None
    transformer: bool | None = None
    recurrent: bool | None = None
    sequential_blocks: bool | None = None
    pre_ln_switchable: bool = False
    example_input: bool | None = None
    activation_modules: bool | None = None
    residual_blocks: list[str] = field(default_factory=list)
    recurrent_layers: list[str] = field(default_factory=list)
    unchecked: dict[str, str] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """Number of weight layers."""
        return len(self.weight_layers)

    @property
    def kinds(self) -> set[str]:
        """Activation kinds present."""
        return set(self.activations.values())

    @property
    def saturating(self) -> set[str]:
        """Saturating activation kinds present (sigmoid, tanh, ...)."""
        return self.kinds & set(stats.SATURATING)

    @property
    def rectifiers(self) -> set[str]:
        """ReLU-family activation kinds present."""
        return self.kinds & set(stats.RECTIFIERS)

    @property
    def adaptive_optimizer(self) -> bool:
        """The run already used a scale-free (adaptive or sign-based) optimiser."""
        return self.optimizer is not None and self.optimizer in _ADAPTIVE

    def label(self, names: list[str]) -> str:
        """``"layers 1-27"`` / ``"layer 3"`` / ``"layers 2, 5-7"`` for the given layer names."""
        idx = sorted({self.block.get(n, 0) for n in names})
        if not idx:
            return "no layers"
        parts, start, prev = [], idx[0], idx[0]
        for i in idx[1:] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            if i is not None:
                start = prev = i
        word = "layer" if len(idx) == 1 else "layers"
        return f"{word} {', '.join(parts)}"


def context_of(record: Record) -> Context:
    """Read a :class:`Context` from ``record.layers`` and ``record.meta``."""
    ctx = Context()
    params = [i for i in record.layers.values() if i.role == "param"]
    modules = [i for i in record.layers.values() if i.role == "module"]
    entries = _weight_layers(params, modules)
    ctx.weight_layers = [e[2] for e in entries]
    ctx.weight_params = {e[2]: e[3] for e in entries}
    depths = np.asarray([e[0] for e in entries], dtype=np.int64)
    for m in modules:
        # block = number of weight layers at or before this module's depth
        ctx.block[m.name] = int(np.searchsorted(depths, m.depth, side="right"))
        if m.activation is not None:
            ctx.activations[m.name] = m.activation
        if any(t in m.type for t in _BN_TYPES):
            ctx.has_bn = True
        if any(t in m.type for t in _OTHER_NORM_TYPES):
            ctx.has_other_norm = True
    for p in params:
        owner = p.module or p.name
        ctx.block[p.name] = ctx.block.get(owner, int(np.searchsorted(depths, p.depth, "right")))
    for i, n in enumerate(ctx.weight_layers):
        ctx.block[n] = i + 1
        ctx.block.setdefault(ctx.weight_params[n], i + 1)
    ctx.sigma_w2 = _sigma_w2(record, ctx)
    _read_meta(record, ctx)
    blocks = [i for i in record.layers.values() if i.role == "block" and i.residual]
    ctx.residual_blocks = [i.name for i in sorted(blocks, key=lambda i: i.depth)]
    ctx.recurrent_layers = [m.name for m in modules if m.time_steps]
    if ctx.recurrent_layers and ctx.recurrent is None:
        ctx.recurrent = True
    return ctx


def _weight_layers(params: list[LayerInfo], modules: list[LayerInfo]
                   ) -> list[tuple[int, int, str, str]]:
    """``(depth, tie, layer, weight param)`` of each weight layer, in forward order.

    Weight layers are the call sites of modules owning a >= 2-D parameter (a module called
    twice is two layers of the path); biases and norm gains are 1-D and do not make a layer.
    Parameters kept off the signal path (used outside any module call, place unknown) are
    never a reference layer.
    """
    first_weight: dict[str, tuple[int, str]] = {}
    for p in sorted(params, key=lambda i: i.depth):
        if p.shape is not None and len(p.shape) >= 2 and p.on_path:
            owner = p.module or p.name
            first_weight.setdefault(owner, (p.depth, p.name))
    entries: list[tuple[int, int, str, str]] = []
    sited: set[str] = set()
    for m in modules:
        owner = m.module or m.name
        if owner in first_weight and m.on_path:
            entries.append((m.depth, 0, m.name, first_weight[owner][1]))
            sited.add(owner)
    for owner, (d, pname) in first_weight.items():
        if owner not in sited:  # a parameter acting without a module call of its own
            entries.append((d, 1, owner, pname))
    entries.sort(key=lambda e: (e[0], e[1]))
    return entries


def _read_meta(record: Record, ctx: Context) -> None:
    """What ``record.meta`` says about the model and the run, into ``ctx``."""
    res = record.meta.get("residual")
    ctx.residual = bool(res) if res is not None else None
    placement = record.meta.get("norm_placement")
    ctx.norm_placement = placement if isinstance(placement, str) else None
    for key in ("transformer", "recurrent", "sequential_blocks", "example_input",
                "activation_modules"):
        v = record.meta.get(key)
        setattr(ctx, key, bool(v) if v is not None else None)
    ctx.pre_ln_switchable = bool(record.meta.get("pre_ln_switchable", False))
    ctx.unchecked = dict(record.meta.get("unchecked") or {})
    opt = record.meta.get("optimizer")
    if isinstance(opt, str):
        ctx.optimizer = opt.lower()
    elif isinstance(opt, dict) and isinstance(opt.get("name"), str):
        ctx.optimizer = opt["name"].lower()


def _sigma_w2(record: Record, ctx: Context) -> float:
    """sigma_w^2 = fan_in Var(W): for W of shape [fan_out, ...] with zero-mean entries,
    ||W||_F^2 = fan_out * fan_in * Var(W), so sigma_w^2 ~= ||W||_F^2 / fan_out."""
    if not record.steps or ctx.depth < 2:
        return math.nan
    s0 = record.steps[0]
    vals = []
    for m in ctx.weight_layers[:-1]:
        p = ctx.weight_params[m]
        info = record.layers.get(p)
        w = record.get(s0, p, "weight_norm")
        if info is not None and info.shape and math.isfinite(w) and info.shape[0] > 0:
            vals.append(w * w / info.shape[0])
    return float(np.median(vals)) if vals else math.nan


def finite(values: np.ndarray) -> np.ndarray:
    """The finite entries of ``values`` (1-D)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return v[np.isfinite(v)]


def fmt(v: float, digits: int = 2) -> str:
    """``3.0e-7``, ``0.13``, ``84``: compact numbers for evidence sentences
    (:func:`signalprop._format.fmt_number`)."""
    return fmt_number(v, digits, missing="NaN", small=1e-2, compact_exp=True)


def pct(v: float) -> str:
    """``0.843`` -> ``"84%"``."""
    return f"{100 * v:.0f}%"
