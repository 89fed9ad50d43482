"""The activation vocabulary: one entry per activation, carrying every face the package uses.

Each :class:`ActivationDef` (registered in :data:`ACTIVATIONS` under its canonical name) holds:

- ``module``: the ``nn.Module`` factory (torch's own class where torch has one, so that the probe
  recognises a user's ``nn.Tanh()`` too), with default hyper-parameters ``defaults``;
- ``classes`` / ``class_names``: the module classes (and class names, for Hugging Face's
  ``transformers.activations``) the probe reads as this activation;
- ``numpy``: ``(**hparams) -> (phi, phi')`` as vectorised float64 NumPy functions, for the
  mean-field theory (:mod:`signalprop.theory.activations`), with ``kinks`` and ``homogeneous``;
- ``kernel``: the batched engine's forward and hand-written backward (:class:`Kernel`), at the
  default hyper-parameters (:mod:`signalprop.engine.activations`);
- ``saturation``: the probe's saturation rule (:class:`Saturation`: |phi'| from the output or the
  input, and max |phi'|), and ``rectifier``: whether its units can die (:mod:`signalprop.stats`);
  ``output_range``: the bounds of a bounded output (the report's histograms);
- ``functions`` / ``inplace``: the functional torch forms the probe's functional mode reads as this
  activation (``torch.tanh``, ``F.relu_`` ...), the in-place ones listed again in ``inplace``.

A face is ``None`` where the package has no such implementation. The other tables of activations
(theory, engine, remedies, probe, stats, lab) are views of this one (:meth:`Registry.derive`), so
a name and its aliases (``"identity"`` -> ``"linear"``, ``"swish"`` -> ``"silu"``) are resolved
once, here. Custom modules declare their name with a class attribute
``signalprop_activation = "gaussian"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from signalprop._registry import Registry

ArrayFn = Callable[[np.ndarray], np.ndarray]
DerivFn = Callable[[torch.Tensor], torch.Tensor]
aten = torch.ops.aten
_T = torch.Tensor

#: SELU constants (Klambauer et al. 2017), as in torch.nn.SELU.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
#: torch's default negative slope of LeakyReLU (the engine's kernel uses this one).
LEAKY_SLOPE = 0.01


# --- the custom modules (torch has no class for these) --------------------------------------------
class Identity(nn.Module):
    """phi(z) = z (the ``linear`` activation: a deep linear network)."""

    signalprop_activation = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Erf(nn.Module):
    """phi(z) = erf(z) (its Gaussian expectations have closed forms; Williams 1997)."""

    signalprop_activation = "erf"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


class Gaussian(nn.Module):
    """phi(z) = exp(-z^2 / 2), a bump saturating on both sides (|phi'| = |z| exp(-z^2/2))."""

    signalprop_activation = "gaussian"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * x * x)


class Sin(nn.Module):
    """phi(z) = sin(z) (periodic; never saturates for good)."""

    signalprop_activation = "sin"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


# --- faces ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    """The batched engine's form of an activation.

    Attributes:
        forward: ``z -> h`` (any shape).
        backward: ``(dh, z, h) -> dz`` with dz = dh * phi'(z); where PyTorch has one, the fused
            ATen kernel autograd itself calls (one pass over memory).
        fast: Optional faster float32 form ``fast(s * z) == phi(z)``, in place on its argument
            (the engine folds s = ``fast_scale`` into the matmul producing z).
        fast_scale: The factor s.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    fast: Callable[[torch.Tensor], torch.Tensor] | None = None
    fast_scale: float = 1.0


@dataclass(frozen=True)
class Saturation:
    """The probe's saturation rule: a unit is saturated where |phi'| < ratio * ``dmax``.

    Attributes:
        uses_output: ``derivative`` reads the output h (no recomputation) rather than the input z.
        derivative: |phi'| as a function of h (or z).
        dmax: max |phi'|.
        output_threshold: The same rule as a threshold on h, where there is one.
    """

    uses_output: bool
    derivative: DerivFn
    dmax: float
    #: ``ratio -> (center, c)`` with |phi'| < ratio * dmax <=> |h - center| > c, where the rule
    #: is a threshold on the output h (one comparison instead of the derivative)
    output_threshold: Callable[[float], tuple[float, float]] | None = None


@dataclass(frozen=True)
class ActivationDef:
    """One activation and its faces (see the module docstring); ``None`` where absent."""

    name: str
    module: Callable[..., nn.Module]
    doc: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    classes: tuple[type[nn.Module], ...] = ()
    class_names: tuple[str, ...] = ()
    numpy: Callable[..., tuple[ArrayFn, ArrayFn]] | None = None
    kinks: tuple[float, ...] = ()
    homogeneous: bool = False
    kernel: Kernel | None = None
    saturation: Saturation | None = None
    rectifier: bool = False
    functions: tuple[Callable[..., Any], ...] = ()
    inplace: tuple[Callable[..., Any], ...] = ()
    output_range: tuple[float, float] | None = None

    def __call__(self, **hparams: Any) -> nn.Module:
        """The ``nn.Module`` with the defaults updated by ``hparams``."""
        return self.module(**{**self.defaults, **hparams})

    def phi(self, **hparams: Any) -> tuple[ArrayFn, ArrayFn]:
        """``(phi, phi')`` as float64 NumPy functions (``ValueError`` without a NumPy face)."""
        if self.numpy is None:
            raise ValueError(f"activation {self.name!r} has no NumPy form (theory)")
        return self.numpy(**{**self.defaults, **hparams})


def _special() -> Any:
    # scipy.special costs ~90 ms to import (measured over torch's 1.1 s); only the NumPy faces
    # of sigmoid, gelu, silu, softplus and erf need it
    from scipy import special

    return special


# --- NumPy faces (float64) -------------------------------------------------------------------------
def _np_linear() -> tuple[ArrayFn, ArrayFn]:
    return (lambda x: np.array(x, dtype=np.float64, copy=True),
            lambda x: np.ones_like(x, dtype=np.float64))


def _np_relu() -> tuple[ArrayFn, ArrayFn]:
    return lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(np.float64)


def _np_leaky_relu(negative_slope: float = LEAKY_SLOPE) -> tuple[ArrayFn, ArrayFn]:
    a = float(negative_slope)
    return lambda x: np.where(x > 0, x, a * x), lambda x: np.where(x > 0, 1.0, a)


def _np_elu(alpha: float = 1.0, scale: float = 1.0) -> tuple[ArrayFn, ArrayFn]:
    al, lam = float(alpha), float(scale)
    return (lambda x: lam * np.where(x > 0, x, al * np.expm1(np.minimum(x, 0.0))),
            lambda x: lam * np.where(x > 0, 1.0, al * np.exp(np.minimum(x, 0.0))))


def _np_selu() -> tuple[ArrayFn, ArrayFn]:
    return _np_elu(SELU_ALPHA, SELU_SCALE)


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _np_gelu() -> tuple[ArrayFn, ArrayFn]:
    sp = _special()
    return (lambda x: x * sp.ndtr(x),
            lambda x: sp.ndtr(x) + x * _INV_SQRT_2PI * np.exp(-0.5 * x * x))


def _np_silu() -> tuple[ArrayFn, ArrayFn]:
    sp = _special()

    def dphi(x: np.ndarray) -> np.ndarray:
        s = sp.expit(x)
        return s * (1.0 + x * (1.0 - s))

    return lambda x: x * sp.expit(x), dphi


def _np_softplus() -> tuple[ArrayFn, ArrayFn]:
    return lambda x: np.logaddexp(0.0, x), _special().expit


def _np_sigmoid() -> tuple[ArrayFn, ArrayFn]:
    sp = _special()

    def dphi(x: np.ndarray) -> np.ndarray:
        s = sp.expit(x)
        return s * (1.0 - s)

    return sp.expit, dphi


def _np_tanh() -> tuple[ArrayFn, ArrayFn]:
    def dphi(x: np.ndarray) -> np.ndarray:
        # 1/cosh^2 stays accurate in the tails where 1 - tanh^2 cancels to 0
        c = np.cosh(np.minimum(np.abs(x), 350.0))
        return 1.0 / (c * c)

    return np.tanh, dphi


def _np_softsign() -> tuple[ArrayFn, ArrayFn]:
    return lambda x: x / (1.0 + np.abs(x)), lambda x: 1.0 / (1.0 + np.abs(x)) ** 2


def _np_hardtanh() -> tuple[ArrayFn, ArrayFn]:
    return lambda x: np.clip(x, -1.0, 1.0), lambda x: (np.abs(x) < 1.0).astype(np.float64)


def _np_erf() -> tuple[ArrayFn, ArrayFn]:
    c = 2.0 / math.sqrt(math.pi)
    return _special().erf, lambda x: c * np.exp(-x * x)


def _np_gaussian() -> tuple[ArrayFn, ArrayFn]:
    return lambda x: np.exp(-0.5 * x * x), lambda x: -x * np.exp(-0.5 * x * x)


def _np_sin() -> tuple[ArrayFn, ArrayFn]:
    return np.sin, np.cos


# --- engine kernels ----------------------------------------------------------------------------
def _tanh_from_2z_(t: torch.Tensor) -> torch.Tensor:
    """tanh(z) = 2 sigmoid(2z) - 1, in place on t = 2z.

    On CPU torch's sigmoid is ~2-3x cheaper than its tanh (measured: 129 vs 341 us on a
    [32, 64, 64] float32 tensor, one thread), and tanh is the costliest op of a small tanh MLP's
    step after the matmuls. Absolute error <= 1.8e-7 in float32 (torch.tanh: 3e-8); used for
    float32 only.
    """
    return t.sigmoid_().mul_(2.0).sub_(1.0)


_K_LINEAR = Kernel(lambda z: z, lambda dh, z, h: dh)
_K_TANH = Kernel(torch.tanh, lambda dh, z, h: aten.tanh_backward(dh, h), _tanh_from_2z_, 2.0)
_K_SIGMOID = Kernel(torch.sigmoid, lambda dh, z, h: aten.sigmoid_backward(dh, h))
_K_RELU = Kernel(torch.relu, lambda dh, z, h: aten.threshold_backward(dh, h, 0))
_K_LEAKY = Kernel(lambda z: F.leaky_relu(z, LEAKY_SLOPE),
                  lambda dh, z, h: aten.leaky_relu_backward(dh, z, LEAKY_SLOPE, False))
_K_ELU = Kernel(F.elu, lambda dh, z, h: aten.elu_backward(dh, 1.0, 1.0, 1.0, True, h))
_K_SELU = Kernel(torch.selu,
                 lambda dh, z, h: aten.elu_backward(dh, SELU_ALPHA, SELU_SCALE, 1.0, True, h))
_K_GELU = Kernel(F.gelu, lambda dh, z, h: aten.gelu_backward(dh, z))
_K_SOFTPLUS = Kernel(F.softplus, lambda dh, z, h: aten.softplus_backward(dh, z, 1.0, 20.0))
# softsign h = z/(1+|z|): phi'(z) = 1/(1+|z|)^2 = (1-|h|)^2
_K_SOFTSIGN = Kernel(F.softsign, lambda dh, z, h: dh * (1 - h.abs()).square())
# gaussian h = exp(-z^2/2): phi'(z) = -z h
_K_GAUSSIAN = Kernel(lambda z: torch.exp(-0.5 * z * z), lambda dh, z, h: -(dh * z * h))
_K_SILU = Kernel(F.silu, lambda dh, z, h: aten.silu_backward(dh, z))
_K_HARDTANH = Kernel(F.hardtanh, lambda dh, z, h: aten.hardtanh_backward(dh, z, -1.0, 1.0))
_K_RELU6 = Kernel(F.relu6, lambda dh, z, h: aten.hardtanh_backward(dh, z, 0.0, 6.0))


# --- saturation (the probe): |phi'| from the output h where possible, else from the input z ------
def _sigmoid_d(h: torch.Tensor) -> torch.Tensor:
    return h * (1 - h)


def _tanh_d(h: torch.Tensor) -> torch.Tensor:
    return 1 - h * h


def _softsign_d(h: torch.Tensor) -> torch.Tensor:
    # h = z / (1 + |z|)  =>  phi'(z) = 1 / (1 + |z|)^2 = (1 - |h|)^2
    return (1 - h.abs()) ** 2


def _gaussian_d_from_input(z: torch.Tensor) -> torch.Tensor:
    # phi(z) = exp(-z^2/2), |phi'(z)| = |z| exp(-z^2/2)
    return z.abs() * torch.exp(-0.5 * z * z)


# sigmoid: h(1-h) < r/4 <=> |h - 1/2| > sqrt(1 - r)/2; tanh: 1 - h^2 < r <=> |h| > sqrt(1 - r);
# softsign: (1 - |h|)^2 < r <=> |h| > 1 - sqrt(r)
def _sigmoid_threshold(r: float) -> tuple[float, float]:
    return 0.5, 0.5 * math.sqrt(max(1.0 - r, 0.0))


def _tanh_threshold(r: float) -> tuple[float, float]:
    return 0.0, math.sqrt(max(1.0 - r, 0.0))


def _softsign_threshold(r: float) -> tuple[float, float]:
    return 0.0, 1.0 - math.sqrt(max(r, 0.0))


def _hardtanh_d_from_input(z: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    return ((z > lo) & (z < hi)).to(z.dtype)


# --- the table -----------------------------------------------------------------------------------
ACTIVATIONS: Registry[ActivationDef] = Registry("activation")


def _add(d: ActivationDef) -> None:
    ACTIVATIONS.register(d.name, d, doc=d.doc, **d.defaults)


_K0 = (0.0,)  # a kink at z = 0 (a panel edge for the theory's quadrature)
_GELU_NAMES = ("GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
               "GELUTanh", "ClippedGELUActivation", "AccurateGELUActivation", "PytorchGELUTanh")

for _d in (
    ActivationDef("linear", Identity, "z", classes=(Identity,), numpy=_np_linear,
                  homogeneous=True, kernel=_K_LINEAR),
    ActivationDef("relu", nn.ReLU, "max(0, z)", classes=(nn.ReLU,), numpy=_np_relu, kinks=_K0,
                  homogeneous=True, kernel=_K_RELU, rectifier=True,
                  functions=(F.relu, torch.relu, _T.relu, F.relu_, torch.relu_, _T.relu_),
                  inplace=(F.relu_, torch.relu_, _T.relu_)),
    ActivationDef("relu6", nn.ReLU6, "min(max(0, z), 6)", classes=(nn.ReLU6,), kernel=_K_RELU6,
                  rectifier=True, functions=(F.relu6,)),
    ActivationDef("leaky_relu", nn.LeakyReLU, "max(z, a z); torch's default a = 0.01",
                  {"negative_slope": LEAKY_SLOPE}, (nn.LeakyReLU,), numpy=_np_leaky_relu,
                  kinks=_K0, homogeneous=True, kernel=_K_LEAKY, rectifier=True,
                  functions=(F.leaky_relu, F.leaky_relu_), inplace=(F.leaky_relu_,)),
    ActivationDef("rrelu", nn.RReLU, "randomised leaky slope (Xu et al. 2015)",
                  {"lower": 1.0 / 8, "upper": 1.0 / 3}, (nn.RReLU,), rectifier=True),
    ActivationDef("elu", nn.ELU, "z > 0: z; else alpha (e^z - 1)", {"alpha": 1.0}, (nn.ELU,),
                  numpy=_np_elu, kinks=_K0, kernel=_K_ELU,
                  functions=(F.elu, F.elu_), inplace=(F.elu_,)),
    ActivationDef("selu", nn.SELU, "self-normalising ELU (Klambauer et al. 2017)",
                  classes=(nn.SELU,), numpy=_np_selu, kinks=_K0, kernel=_K_SELU,
                  functions=(F.selu, torch.selu, torch.selu_), inplace=(torch.selu_,)),
    ActivationDef("celu", nn.CELU, "continuously differentiable ELU", classes=(nn.CELU,),
                  functions=(F.celu,)),
    ActivationDef("gelu", nn.GELU, "z Phi(z), Phi the standard normal cdf (torch's exact GELU)",
                  classes=(nn.GELU,), class_names=_GELU_NAMES, numpy=_np_gelu, kernel=_K_GELU,
                  functions=(F.gelu,)),
    ActivationDef("silu", nn.SiLU, "z sigmoid(z) (swish)", classes=(nn.SiLU,),
                  class_names=("SiLUActivation",), numpy=_np_silu, kernel=_K_SILU,
                  functions=(F.silu,)),
    ActivationDef("mish", nn.Mish, "z tanh(softplus(z))", classes=(nn.Mish,),
                  class_names=("MishActivation",),
                  functions=(F.mish,)),
    ActivationDef("softplus", nn.Softplus, "log(1 + e^z)", classes=(nn.Softplus,),
                  numpy=_np_softplus, kernel=_K_SOFTPLUS,
                  functions=(F.softplus,)),
    ActivationDef("sigmoid", nn.Sigmoid, "1 / (1 + e^-z)", classes=(nn.Sigmoid,),
                  numpy=_np_sigmoid, kernel=_K_SIGMOID, saturation=Saturation(True, _sigmoid_d, 0.25, _sigmoid_threshold),
                  output_range=(0.0, 1.0),
                  functions=(torch.sigmoid, _T.sigmoid, F.sigmoid, torch.sigmoid_, _T.sigmoid_),
                  inplace=(torch.sigmoid_, _T.sigmoid_)),
    ActivationDef("tanh", nn.Tanh, "tanh z", classes=(nn.Tanh,), numpy=_np_tanh, kernel=_K_TANH,
                  saturation=Saturation(True, _tanh_d, 1.0, _tanh_threshold), output_range=(-1.0, 1.0),
                  functions=(torch.tanh, _T.tanh, F.tanh, torch.tanh_, _T.tanh_),
                  inplace=(torch.tanh_, _T.tanh_)),
    ActivationDef("softsign", nn.Softsign, "z / (1 + |z|)", classes=(nn.Softsign,),
                  numpy=_np_softsign, kinks=_K0, kernel=_K_SOFTSIGN,
                  saturation=Saturation(True, _softsign_d, 1.0, _softsign_threshold),
                  output_range=(-1.0, 1.0), functions=(F.softsign,)),
    ActivationDef("hardtanh", nn.Hardtanh, "clip(z, -1, 1)", classes=(nn.Hardtanh,),
                  numpy=_np_hardtanh, kinks=(-1.0, 1.0), kernel=_K_HARDTANH,
                  saturation=Saturation(False, _hardtanh_d_from_input, 1.0),
                  functions=(F.hardtanh, F.hardtanh_), inplace=(F.hardtanh_,)),
    ActivationDef("hardsigmoid", nn.Hardsigmoid, "clip(z/6 + 1/2, 0, 1)",
                  classes=(nn.Hardsigmoid,),
                  functions=(F.hardsigmoid,)),
    ActivationDef("hardswish", nn.Hardswish, "z hardsigmoid(z)", classes=(nn.Hardswish,),
                  functions=(F.hardswish,)),
    ActivationDef("logsigmoid", nn.LogSigmoid, "log sigmoid(z)", classes=(nn.LogSigmoid,),
                  functions=(F.logsigmoid,)),
    ActivationDef("tanhshrink", nn.Tanhshrink, "z - tanh z", classes=(nn.Tanhshrink,)),
    ActivationDef("erf", Erf, "erf z", classes=(Erf,), numpy=_np_erf),
    ActivationDef("gaussian", Gaussian, "exp(-z^2 / 2)", classes=(Gaussian,), numpy=_np_gaussian,
                  kernel=_K_GAUSSIAN,
                  saturation=Saturation(False, _gaussian_d_from_input, math.exp(-0.5))),
    ActivationDef("sin", Sin, "sin z", classes=(Sin,), numpy=_np_sin),
):
    _add(_d)
ACTIVATIONS.alias("identity", "linear")
ACTIVATIONS.alias("swish", "silu")
ACTIVATIONS.alias("lrelu", "leaky_relu")

#: module class -> canonical name; looked up along the MRO, so ReLU6 (a Hardtanh subclass) and a
#: user's subclass of nn.Tanh both find their nearest registered class.
_BY_CLASS: dict[type, str] = {c: d.name for d in map(ACTIVATIONS.get, ACTIVATIONS) for c in d.classes}
#: class name -> canonical name (Hugging Face's activations compute some functions from others,
#: NewGELU from tanh, so the name is the only safe guide).
_BY_CLASS_NAME: dict[str, str] = {
    n: d.name for d in map(ACTIVATIONS.get, ACTIVATIONS) for n in d.class_names
}


def activation(name: str) -> ActivationDef:
    """The :class:`ActivationDef` of ``name`` or an alias (``ValueError`` listing valid names)."""
    return ACTIVATIONS.get(name)


def activation_kind(module: nn.Module) -> str | None:
    """Canonical activation name of ``module`` or ``None``.

    Custom modules declare theirs with a class attribute ``signalprop_activation = "gaussian"``.
    """
    custom = getattr(module, "signalprop_activation", None)
    if isinstance(custom, str):
        return custom
    for cls in type(module).__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    return _BY_CLASS_NAME.get(type(module).__name__)


def infer_activation(model: nn.Module) -> str:
    """The single activation kind used by ``model``'s hidden layers.

    Raises:
        ValueError: when the model has no recognisable activation module (functional calls such
            as ``torch.tanh`` inside ``forward`` are invisible), or mixes several kinds.
    """
    found = sorted({k for _, m in model.named_modules() if (k := activation_kind(m)) is not None})
    if not found:
        raise ValueError(
            f"cannot infer the activation of {type(model).__name__}: it has no activation "
            "modules (activations called functionally inside forward(), e.g. torch.tanh, are "
            "invisible; use nn.Tanh() etc. or pass the activation explicitly)"
        )
    if len(found) > 1:
        raise ValueError(
            f"cannot infer one activation for {type(model).__name__}: it mixes {found}; "
            "pass the activation explicitly"
        )
    return found[0]
