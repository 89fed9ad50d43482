"""Activations for the mean-field theory: phi and phi' as vectorised NumPy functions.

Every theory function accepts an *activation spec*, resolved by :func:`get_activation`:

- a registered name (``"tanh"``, ``"relu"``, ...; the canonical names and aliases of
  :mod:`signalprop.vocab.activations`, whose NumPy face this is), optionally with hyper-parameters
  (``get_activation("leaky_relu", negative_slope=0.2)``);
- an :class:`Activation` (returned as is);
- any Python callable: a torch function or ``nn.Module`` (``torch.tanh``, ``nn.GELU()``; phi' by
  torch autograd, in float64), or a NumPy function (phi' by central finite differences).

The named activations carry exact derivatives and, where the Gaussian integrals have one, a
closed form (see :mod:`signalprop.theory.closed_forms`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from signalprop._registry import Entry, Registry
from signalprop.vocab.activations import ACTIVATIONS as VOCAB
from signalprop.vocab.activations import SELU_ALPHA  # noqa: F401 (public name of this module)
from signalprop.vocab.activations import SELU_SCALE as SELU_LAMBDA  # noqa: F401 (likewise)

ArrayFn = Callable[[np.ndarray], np.ndarray]


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


def _theory_face(e: Entry[Any]) -> Callable[..., Activation] | None:
    d = e.fn
    if d.numpy is None:
        return None

    def build(**hparams: Any) -> Activation:
        phi, dphi = d.numpy(**hparams)
        return Activation(d.name, phi, dphi, {k: float(v) for k, v in hparams.items()},
                          kinks=d.kinks, homogeneous=d.homogeneous)

    return build


#: The theory's activations: the NumPy face of the vocabulary (:mod:`signalprop.vocab`), built
#: with the registered defaults updated by the caller's hyper-parameters.
ACTIVATIONS: Registry = VOCAB.derive(_theory_face)


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
