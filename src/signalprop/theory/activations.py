"""Activations for the mean-field theory: phi and phi' as vectorised NumPy functions.

Every theory function accepts an *activation spec*, resolved by :func:`get_activation`:

- a registered name (``"tanh"``, ``"relu"``, ...; the same canonical names as the ``nn.Module``
  registry in :mod:`signalprop.remedies.activations`), optionally with hyper-parameters
  (``get_activation("leaky_relu", negative_slope=0.2)``);
- an :class:`Activation` (returned as is);
- any Python callable: a torch function or ``nn.Module`` (``torch.tanh``, ``nn.GELU()``; phi' by
  torch autograd, in float64), or a NumPy function (phi' by central finite differences).

The named activations carry exact derivatives and, where the Gaussian integrals have one, a
closed form (see :mod:`signalprop.theory.closed_forms`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special

from signalprop._registry import Registry

ArrayFn = Callable[[np.ndarray], np.ndarray]

#: Points where a registered activation (or its derivative) is not smooth, in pre-activation
#: units; the adaptive quadrature puts panel edges there.
_KINKS_AT_ZERO = (0.0,)


@dataclass(frozen=True)
class Activation:
    """An element-wise non-linearity phi with its derivative phi'.

    Attributes:
        name: Canonical name (or a description of the callable).
        phi: Vectorised phi: float64 array -> array of the same shape.
        dphi: Vectorised phi'.
        hparams: The hyper-parameters it was built with (e.g. ``negative_slope``).
        kinks: Points where phi or phi' is not smooth (breakpoints for quadrature).
        homogeneous: True when phi(a x) = a phi(x) for a > 0 (linear, relu, leaky_relu): then
            every q is a fixed point at the critical sigma_w and chi_1 does not depend on q.
        derivative: How phi' is obtained: ``"exact"``, ``"autograd"`` or ``"finite-difference"``.
        source: The user's callable this was built from (``None`` for registered names); the
            torch adapter runs it directly in networks.
    """

    name: str
    phi: ArrayFn
    dphi: ArrayFn
    hparams: dict[str, Any] = field(default_factory=dict)
    kinks: tuple[float, ...] = ()
    homogeneous: bool = False
    derivative: str = "exact"
    source: Callable[..., Any] | None = field(default=None, compare=False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.phi(np.asarray(x, dtype=np.float64))

    def derivative_at(self, x: float | np.ndarray) -> np.ndarray:
        """phi'(x) as a float64 array."""
        return self.dphi(np.asarray(x, dtype=np.float64))

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"Activation({self.name}{', ' + hp if hp else ''})"


ACTIVATIONS: Registry = Registry("activation")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return special.expit(x)


@ACTIVATIONS.register("linear", doc="phi(x) = x")
def _linear() -> Activation:
    return Activation("linear", lambda x: np.array(x, dtype=np.float64, copy=True),
                      lambda x: np.ones_like(x, dtype=np.float64), homogeneous=True)


@ACTIVATIONS.register("relu", doc="max(0, x)")
def _relu() -> Activation:
    return Activation("relu", lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(np.float64),
                      kinks=_KINKS_AT_ZERO, homogeneous=True)


@ACTIVATIONS.register("leaky_relu", negative_slope=0.01, doc="max(x, a x); torch's default a")
def _leaky_relu(negative_slope: float = 0.01) -> Activation:
    a = float(negative_slope)
    return Activation(
        "leaky_relu",
        lambda x: np.where(x > 0, x, a * x),
        lambda x: np.where(x > 0, 1.0, a),
        {"negative_slope": a},
        kinks=_KINKS_AT_ZERO,
        homogeneous=True,
    )


@ACTIVATIONS.register("elu", alpha=1.0, doc="x > 0: x; else alpha (e^x - 1)")
def _elu(alpha: float = 1.0) -> Activation:
    al = float(alpha)
    return Activation(
        "elu",
        lambda x: np.where(x > 0, x, al * np.expm1(np.minimum(x, 0.0))),
        lambda x: np.where(x > 0, 1.0, al * np.exp(np.minimum(x, 0.0))),
        {"alpha": al},
        kinks=_KINKS_AT_ZERO,
    )


#: SELU constants (Klambauer et al. 2017), as in torch.nn.SELU.
SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717


@ACTIVATIONS.register("selu", doc="lambda * elu(x, alpha) with Klambauer et al.'s constants")
def _selu() -> Activation:
    lam, al = SELU_LAMBDA, SELU_ALPHA
    return Activation(
        "selu",
        lambda x: lam * np.where(x > 0, x, al * np.expm1(np.minimum(x, 0.0))),
        lambda x: lam * np.where(x > 0, 1.0, al * np.exp(np.minimum(x, 0.0))),
        kinks=_KINKS_AT_ZERO,
    )


_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@ACTIVATIONS.register("gelu", doc="x Phi(x), Phi the standard normal cdf (torch's exact GELU)")
def _gelu() -> Activation:
    def phi(x: np.ndarray) -> np.ndarray:
        return x * special.ndtr(x)

    def dphi(x: np.ndarray) -> np.ndarray:
        return special.ndtr(x) + x * _INV_SQRT_2PI * np.exp(-0.5 * x * x)

    return Activation("gelu", phi, dphi)


@ACTIVATIONS.register("silu", doc="x sigmoid(x) (swish)")
def _silu() -> Activation:
    def dphi(x: np.ndarray) -> np.ndarray:
        s = _sigmoid(x)
        return s * (1.0 + x * (1.0 - s))

    return Activation("silu", lambda x: x * _sigmoid(x), dphi)


@ACTIVATIONS.register("softplus", doc="log(1 + e^x)")
def _softplus() -> Activation:
    return Activation("softplus", lambda x: np.logaddexp(0.0, x), _sigmoid)


@ACTIVATIONS.register("sigmoid", doc="1 / (1 + e^-x)")
def _sigmoid_act() -> Activation:
    def dphi(x: np.ndarray) -> np.ndarray:
        s = _sigmoid(x)
        return s * (1.0 - s)

    return Activation("sigmoid", _sigmoid, dphi)


@ACTIVATIONS.register("tanh", doc="tanh x")
def _tanh() -> Activation:
    def dphi(x: np.ndarray) -> np.ndarray:
        # 1/cosh^2 stays accurate in the tails where 1 - tanh^2 cancels to 0
        c = np.cosh(np.minimum(np.abs(x), 350.0))
        return 1.0 / (c * c)

    return Activation("tanh", np.tanh, dphi)


@ACTIVATIONS.register("softsign", doc="x / (1 + |x|)")
def _softsign() -> Activation:
    return Activation(
        "softsign",
        lambda x: x / (1.0 + np.abs(x)),
        lambda x: 1.0 / (1.0 + np.abs(x)) ** 2,
        kinks=_KINKS_AT_ZERO,
    )


@ACTIVATIONS.register("hardtanh", doc="clip(x, -1, 1)")
def _hardtanh() -> Activation:
    return Activation(
        "hardtanh",
        lambda x: np.clip(x, -1.0, 1.0),
        lambda x: (np.abs(x) < 1.0).astype(np.float64),
        kinks=(-1.0, 1.0),
    )


@ACTIVATIONS.register("erf", doc="erf x")
def _erf() -> Activation:
    c = 2.0 / math.sqrt(math.pi)
    return Activation("erf", special.erf, lambda x: c * np.exp(-x * x))


@ACTIVATIONS.register("gaussian", doc="exp(-x^2 / 2)")
def _gaussian() -> Activation:
    return Activation(
        "gaussian", lambda x: np.exp(-0.5 * x * x), lambda x: -x * np.exp(-0.5 * x * x)
    )


@ACTIVATIONS.register("sin", doc="sin x")
def _sin() -> Activation:
    return Activation("sin", np.sin, np.cos)


def activation_names() -> list[str]:
    """The registered activation names, sorted."""
    return ACTIVATIONS.names()


def _is_torch_callable(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` maps a float64 torch tensor to a same-shaped tensor *differentiably*
    (a NumPy ufunc such as ``np.tanh`` also returns a tensor, but outside autograd)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    try:
        x = torch.linspace(-2.0, 2.0, 5, dtype=torch.float64, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.enable_grad():
                y = fn(x)
    except Exception:
        return False
    return isinstance(y, torch.Tensor) and tuple(y.shape) == (5,) and y.requires_grad


def _from_torch(fn: Callable[..., Any], name: str) -> Activation:
    import torch

    def phi(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return fn(torch.as_tensor(np.asarray(x, dtype=np.float64))).double().numpy()

    def dphi(x: np.ndarray) -> np.ndarray:
        # element-wise phi: d(sum phi)/dx_i = phi'(x_i)
        t = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
        with torch.enable_grad():
            y = fn(t)
            (g,) = torch.autograd.grad(y.sum(), t, allow_unused=True)
        if g is None:  # phi does not depend on x (a constant)
            return np.zeros_like(np.asarray(x, dtype=np.float64))
        return g.double().numpy()

    return Activation(name, phi, dphi, derivative="autograd", source=fn)


def _from_numpy(fn: Callable[..., Any], name: str) -> Activation:
    def phi(x: np.ndarray) -> np.ndarray:
        return np.asarray(fn(np.asarray(x, dtype=np.float64)), dtype=np.float64)

    def dphi(x: np.ndarray) -> np.ndarray:
        # central differences, step ~ eps^(1/3) * scale: error O(h^2) ~ 1e-10 relative
        x = np.asarray(x, dtype=np.float64)
        h = 6e-6 * np.maximum(1.0, np.abs(x))
        return (phi(x + h) - phi(x - h)) / (2.0 * h)

    return Activation(name, phi, dphi, derivative="finite-difference", source=fn)


def _callable_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    mod = getattr(fn, "__module__", None)
    return f"{mod}.{name}" if mod and mod not in ("builtins", "__main__") else str(name)


def get_activation(spec: str | Activation | Callable[..., Any], **hparams: Any) -> Activation:
    """Resolve an activation spec to an :class:`Activation`.

    Args:
        spec: A registered name, an :class:`Activation`, or a callable (torch or NumPy,
            element-wise).
        **hparams: Hyper-parameters of a registered activation (e.g. ``negative_slope``).

    Raises:
        ValueError: unknown name (the message lists the valid ones), or a callable that is not
            element-wise or returns non-numbers.
        TypeError: ``spec`` is neither a string nor callable.
    """
    if isinstance(spec, Activation):
        if hparams:
            raise ValueError("hyper-parameters apply to registered names, not an Activation")
        return spec
    if isinstance(spec, str):
        return ACTIVATIONS.build(spec, **hparams)
    if not callable(spec):
        raise TypeError(
            f"activation must be a registered name or a callable, got {type(spec).__name__}"
        )
    if hparams:
        raise ValueError("hyper-parameters apply to registered names, not to callables")
    name = _callable_name(spec)
    act = _from_torch(spec, name) if _is_torch_callable(spec) else _from_numpy(spec, name)
    # validate: element-wise, finite on a test grid
    x = np.linspace(-3.0, 3.0, 7)
    try:
        y = act.phi(x)
    except Exception as e:
        raise ValueError(f"activation {name!r} cannot be evaluated on a float64 array: {e}") from e
    if np.shape(y) != x.shape:
        raise ValueError(
            f"activation {name!r} must be element-wise: shape {x.shape} -> {np.shape(y)}"
        )
    if not np.all(np.isfinite(y)):
        raise ValueError(f"activation {name!r} returned non-finite values on [-3, 3]")
    return act
