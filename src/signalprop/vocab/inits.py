"""The initialisation vocabulary: weight initialisations, in place, in ``torch.nn.init`` style
(names end in ``_``), registered once in :data:`INITS` (public module: :mod:`signalprop.init`).

Each function takes a tensor (a weight) or a module; given a module it initialises the weight of
every ``nn.Linear`` and ``nn.ConvNd`` inside it and sets their biases to ``bias`` (0 by default;
``None`` leaves biases alone). All return their target.

Formulas (Var W for a layer with fan_in inputs and fan_out outputs):

- :func:`lecun_`: Var W = 1 / fan_in (LeCun et al. 1998; alias ``gaussian``, the lab's name).
- :func:`xavier_`: Var W = gain^2 * 2 / (fan_in + fan_out) (Glorot & Bengio 2010).
- :func:`kaiming_`: Var W = gain^2 / fan_mode with gain^2 = 2 for ReLU (He et al. 2015; alias
  ``he``).
- :func:`orthogonal_`: W = gain * Q with Q orthogonal (Saxe, McClelland & Ganguli 2013).
- :func:`lsuv_`: orthonormal pre-init, then W <- W / sqrt(Var(layer output)) layer by layer on a
  data batch until |Var - 1| < tol (Mishkin & Matas 2016, "All you need is a good init").
- :func:`scale_`: W <- factor * W (a global multiplier, e.g. to move sigma_w).
- :func:`critical_`: weights at the edge of chaos for the model's activation, from
  :mod:`signalprop.theory.torch_adapter` (imported lazily).
- :func:`default_`: PyTorch's own initialisation, left as the layers built it.

Each :class:`InitDef` of :data:`INITS` is callable as its in-place initialiser and carries the
batched engine's face: ``std(fan_in, fan_out)`` for the Gaussian schemes, and ``engine`` (the
engine implements it: :mod:`signalprop.engine.initialise`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from signalprop._registry import Registry, check_choice

__all__ = [
    "INITS", "LSUV_MAX_ITER", "LSUV_TOL", "WEIGHT_LAYERS", "InitDef", "LSUVResult", "Target",
    "apply_init", "call_model", "critical_", "default_", "init", "kaiming_", "lecun_", "lsuv_",
    "orthogonal_", "scale_", "weight_layers", "xavier_",
]

Target = torch.Tensor | nn.Module

#: LSUV (Mishkin & Matas 2016): tolerance on |Var - 1| and the most rescaling passes per layer.
LSUV_TOL = 0.1
LSUV_MAX_ITER = 10

#: Module types whose ``weight`` the module-level initialisers touch.
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear/Conv layer of ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def _targets(target: Target) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(target, torch.Tensor):
        if target.dim() < 2:
            raise ValueError(
                f"can only initialise tensors with >= 2 dimensions (a weight), got shape "
                f"{tuple(target.shape)}"
            )
        return [(target, None)]
    if isinstance(target, nn.Module):
        out = [(m.weight, m.bias) for _, m in weight_layers(target)]
        if not out:
            raise ValueError(
                f"{type(target).__name__} has no nn.Linear or nn.Conv layers to initialise"
            )
        return out
    raise TypeError(f"expected a tensor or an nn.Module, got {type(target).__name__}")


def _set_bias(b: torch.Tensor | None, bias: float | None) -> None:
    if b is not None and bias is not None:
        with torch.no_grad():
            b.fill_(bias)


def xavier_(
    target: Target, gain: float = 1.0, distribution: str = "normal", bias: float | None = 0.0
) -> Target:
    """Glorot/Xavier initialisation: Var W = gain^2 * 2 / (fan_in + fan_out).

    Args:
        target: A weight tensor or a module (all its Linear/Conv layers).
        gain: Multiplier on the standard deviation.
        distribution: ``"normal"`` or ``"uniform"``.
        bias: Value for biases (``None``: untouched).
    """
    check_choice("distribution", distribution, ("normal", "uniform"))
    fn = nn.init.xavier_normal_ if distribution == "normal" else nn.init.xavier_uniform_
    for w, b in _targets(target):
        fn(w, gain=gain)
        _set_bias(b, bias)
    return target


def kaiming_(
    target: Target,
    nonlinearity: str = "relu",
    a: float = 0.0,
    mode: str = "fan_in",
    distribution: str = "normal",
    bias: float | None = 0.0,
) -> Target:
    """He/Kaiming initialisation: Var W = gain^2 / fan_mode (gain^2 = 2 for ReLU).

    Args:
        target: A weight tensor or a module.
        nonlinearity: As ``torch.nn.init.calculate_gain`` (``relu``, ``leaky_relu``, ``tanh``,
            ``sigmoid``, ``selu``, ``linear``).
        a: Negative slope for ``leaky_relu``.
        mode: ``"fan_in"`` (preserves forward variance) or ``"fan_out"`` (backward).
        distribution: ``"normal"`` or ``"uniform"``.
        bias: Value for biases (``None``: untouched).
    """
    check_choice("mode", mode, ("fan_in", "fan_out"))
    check_choice("distribution", distribution, ("normal", "uniform"))
    check_choice(
        "kaiming nonlinearity", nonlinearity, ("relu", "leaky_relu", "tanh", "sigmoid", "selu", "linear")
    )
    fn = nn.init.kaiming_normal_ if distribution == "normal" else nn.init.kaiming_uniform_
    for w, b in _targets(target):
        fn(w, a=a, mode=mode, nonlinearity=nonlinearity)
        _set_bias(b, bias)
    return target


def lecun_(target: Target, distribution: str = "normal", bias: float | None = 0.0) -> Target:
    """LeCun initialisation: Var W = 1 / fan_in (:func:`kaiming_` with a linear gain)."""
    return kaiming_(target, "linear", distribution=distribution, bias=bias)


def default_(target: Target) -> Target:
    """Leave the weights as PyTorch's layers initialised them (the baseline scheme)."""
    _targets(target)  # the same errors as the other schemes for a non-weight target
    return target


def orthogonal_(target: Target, gain: float = 1.0, bias: float | None = 0.0) -> Target:
    """Orthogonal initialisation W = gain * Q (Saxe et al. 2013).

    For a non-square [out, in] weight, Q has orthonormal rows (out <= in) or columns; conv
    kernels are flattened to [out, in * k...]. All singular values equal ``gain``, the
    ingredient of dynamical isometry (Pennington et al. 2017).
    """
    for w, b in _targets(target):
        nn.init.orthogonal_(w, gain=gain)
        _set_bias(b, bias)
    return target


def scale_(target: Target, factor: float, bias: bool = False) -> Target:
    """Multiply every weight (and the biases when ``bias``) by ``factor``, in place."""
    if not math.isfinite(factor):
        raise ValueError(f"scale factor must be finite, got {factor}")
    with torch.no_grad():
        for w, b in _targets(target):
            w.mul_(factor)
            if bias and b is not None:
                b.mul_(factor)
    return target


@dataclass
class LSUVResult:
    """What :func:`lsuv_` did.

    Attributes:
        converged: Every layer reached |Var - 1| < tol within ``max_iter`` rescalings.
        variances: Layer name -> output variance after the last rescaling of that layer.
        iterations: Layer name -> rescalings used.
        not_converged: Names of layers that ran out of iterations (or had zero variance).
    """

    converged: bool
    variances: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, int] = field(default_factory=dict)
    not_converged: list[str] = field(default_factory=list)


class _Stop(Exception):
    pass


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on an example input: a tensor, a tuple of inputs, or a dict of keyword
    arguments (a Hugging Face batch)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _first_tensor(batch: Any) -> torch.Tensor | None:
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(
        batch, tuple) else [batch]
    return next((t for t in items if isinstance(t, torch.Tensor)), None)


def _forward_order(model: nn.Module, batch: Any) -> list[str]:
    """Names of the weight layers in the order the forward pass first calls them."""
    order: list[str] = []
    handles = []
    for name, m in weight_layers(model):
        def hook(mod: nn.Module, inp: Any, out: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order


def _output_var(model: nn.Module, layer: nn.Module, batch: Any) -> float:
    """Variance of ``layer``'s output (first call) on ``batch``; stops the forward pass there."""
    box: list[float] = []

    def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        box.append(float(out.detach().double().var()))
        raise _Stop

    h = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            call_model(model, batch)
    except _Stop:
        pass
    finally:
        h.remove()
    if not box:
        raise RuntimeError("layer was not called in the forward pass")
    return box[0]


def _check_lsuv_args(model: Any, batch: Any, tol: float, max_iter: int) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"lsuv_ needs an nn.Module, got {type(model).__name__}")
    first = _first_tensor(batch)
    if first is None:
        raise TypeError(f"lsuv_ needs an input batch (a tensor, a tuple or a dict of tensors), "
                        f"got {type(batch).__name__}")
    if first.dim() == 0 or first.shape[0] < 2:
        raise ValueError("lsuv_ needs a batch of at least 2 examples to estimate a variance")
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")


def _rescale_to_unit_variance(
    model: nn.Module, layer: nn.Module, batch: Any, tol: float, max_iter: int
) -> tuple[float, int]:
    """W <- W / sqrt(Var(out)) until |Var - 1| < tol: (the last variance, rescalings used)."""
    var = _output_var(model, layer, batch)
    it = 0
    while abs(var - 1.0) >= tol and it < max_iter:
        if not math.isfinite(var) or var <= 0:
            break  # a dead/constant layer (or overflow) cannot be rescaled to unit variance
        with torch.no_grad():
            layer.weight.div_(math.sqrt(var))
        it += 1
        var = _output_var(model, layer, batch)
    return var, it


def lsuv_(
    model: nn.Module,
    batch: torch.Tensor | tuple[Any, ...] | Mapping[str, Any],
    tol: float = LSUV_TOL,
    max_iter: int = LSUV_MAX_ITER,
    pre_init: bool = True,
    zero_bias: bool = True,
    warn: bool = True,
) -> LSUVResult:
    """Layer-sequential unit-variance initialisation (Mishkin & Matas 2016), in place.

    1. (``pre_init``) orthonormal weights (Saxe et al.), biases 0 (``zero_bias``);
    2. for each Linear/Conv layer in forward order: forward ``batch``; while
       |Var(out) - 1| >= tol and fewer than ``max_iter`` rescalings: W <- W / sqrt(Var(out)).

    With zero biases one rescaling is exact for that layer (its output is linear in W); biases
    or a later data-dependent layer make the loop iterate. Later layers never change an earlier
    layer's output, so after the pass every layer's output variance on ``batch`` is as reported.
    The authors' code uses tol 0.1 on the std with 10 iterations (PyTorch) or 0.02 on the
    variance with 20 (Caffe); here ``tol`` bounds the *variance*.

    Args:
        model: The model (its Linear/Conv layers are rescaled). Put it in the mode you want
            statistics for (batch norm in train mode uses batch statistics).
        batch: An input mini-batch [B, ...] on the model's device; a tuple of inputs
            (``model(*batch)``) or a dict of keyword inputs (``model(**batch)``, e.g. a Hugging
            Face batch) for models that take several.
        tol: Tolerance on |Var - 1|.
        max_iter: Rescalings allowed per layer.
        pre_init: Start from orthonormal weights.
        zero_bias: Set biases to 0 during the pre-init.
        warn: Emit a ``RuntimeWarning`` naming the layers that did not converge.

    Returns:
        :class:`LSUVResult` (``converged`` False when some layer did not reach the tolerance).
    """
    _check_lsuv_args(model, batch, tol, max_iter)
    layers = dict(weight_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv layers for LSUV")
    if pre_init:
        orthogonal_(model, bias=0.0 if zero_bias else None)
    res = LSUVResult(converged=True)
    for name in _forward_order(model, batch):
        var, it = _rescale_to_unit_variance(model, layers[name], batch, tol, max_iter)
        res.variances[name] = var
        res.iterations[name] = it
        if not abs(var - 1.0) < tol:
            res.not_converged.append(name)
    res.converged = not res.not_converged
    if warn and not res.converged:
        warnings.warn(
            f"LSUV did not reach |Var - 1| < {tol} within {max_iter} rescalings for layer(s) "
            f"{res.not_converged} (variances: "
            f"{ {n: round(res.variances[n], 4) for n in res.not_converged} })",
            RuntimeWarning,
            stacklevel=2,
        )
    return res


def critical_(*args: Any, **kwargs: Any) -> Any:
    """Initialise at the edge of chaos (chi_1 = 1) for the model's activation.

    Re-exported from :func:`signalprop.theory.torch_adapter.critical_` (Poole et al. 2016,
    Schoenholz et al. 2017), imported on first use so this module imports without it.
    """
    try:
        # lazy: the mean-field theory (scipy) costs ~0.4-0.8 s to import (measured)
        from signalprop.theory.torch_adapter import critical_ as _critical
    except ImportError as e:  # the theory engine is optional at import time
        raise ImportError(
            "critical_ needs signalprop.theory.torch_adapter.critical_, which is not available: "
            f"{e}"
        ) from e
    return _critical(*args, **kwargs)


@dataclass(frozen=True)
class InitDef:
    """One initialisation: its in-place initialiser (``torch``; the entry is callable as it) and
    the batched engine's face (``std(fan_in, fan_out)`` of a Gaussian scheme; ``engine``: the
    engine implements the scheme)."""

    name: str
    torch: Callable[..., Any]
    std: Callable[[int, int], float] | None = None
    engine: bool = False

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        return self.torch(target, *args, **kwargs)


INITS: Registry[InitDef] = Registry("initialisation")
for _d, _defaults in (
    (InitDef("default", default_), {}),
    (InitDef("lecun", lecun_, lambda fi, fo: 1.0 / math.sqrt(fi), True), {"distribution": "normal"}),
    (InitDef("xavier", xavier_, lambda fi, fo: math.sqrt(2.0 / (fi + fo)), True),
     {"gain": 1.0, "distribution": "normal"}),
    (InitDef("kaiming", kaiming_, lambda fi, fo: math.sqrt(2.0 / fi), True),
     {"nonlinearity": "relu", "mode": "fan_in", "distribution": "normal"}),
    (InitDef("orthogonal", orthogonal_, engine=True), {"gain": 1.0}),
    (InitDef("lsuv", lsuv_, engine=True), {"tol": LSUV_TOL, "max_iter": LSUV_MAX_ITER}),
    (InitDef("scale", scale_), {"factor": 1.0}),
    (InitDef("critical", critical_), {}),
):
    INITS.register(_d.name, _d, doc=(_d.torch.__doc__ or "").split("\n")[0], **_defaults)
INITS.alias("he", "kaiming")
INITS.alias("gaussian", "lecun")


def init(name: str) -> InitDef:
    """The :class:`InitDef` of ``name`` or an alias (``ValueError`` listing the valid names)."""
    return INITS.get(name)


def apply_init(name: str, target: Target, *args: Any, **overrides: Any) -> Any:
    """Apply the registered initialisation ``name`` with its defaults updated by ``overrides``."""
    e = INITS.entry(name)
    return e.fn(target, *args, **{**e.defaults, **overrides})
