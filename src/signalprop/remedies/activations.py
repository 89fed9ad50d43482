"""Activation functions as ``nn.Module`` s, registered by their canonical names.

:data:`ACTIVATIONS` is the ``nn.Module`` face of the activation vocabulary
(:mod:`signalprop.vocab.activations`, shared with :mod:`signalprop.theory`, the engine and the
probe). Where torch has a class, the registry builds torch's own module (the probe recognises
those by class); the custom ones (:class:`Erf`, :class:`Gaussian`, :class:`Sin`,
:class:`Identity`, defined in the vocabulary) carry a class attribute ``signalprop_activation``.

Also here:

- :class:`RBF`: a radial-basis-function layer, unit j = exp(-||x - c_j||^2 / (2 s_j^2)), built
  from a :class:`SquaredDistance` pre-activation, a ``norm`` slot (identity until a normalisation
  transform puts a batch/layer norm there) and an :class:`RBFKernel` activation.
- :class:`Scaled`: ``a * phi(z)`` with a fixed or learnable gain; ``a = "nf"`` picks the
  variance-preserving gain of Brock et al. 2021 (NFNets), 1 / std(phi(z)) for z ~ N(0, 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from signalprop._registry import Registry

# the activations themselves, and the canonical name of a module, are defined once in the vocabulary
from signalprop.vocab.activations import ACTIVATIONS as VOCAB
from signalprop.vocab.activations import (  # noqa: F401 (re-exported: public names of this module)
    Erf,
    Gaussian,
    Identity,
    Sin,
    activation_kind,
    infer_activation,
)


class SquaredDistance(nn.Module):
    """The RBF pre-activation u_j = ||x - c_j||^2 for learnable centres ``c`` [out, in].

    Computed as ||x||^2 - 2 x.c_j + ||c_j||^2 (one matmul, like ``nn.Linear``), clamped at 0
    against rounding. Input [B, in] -> output [B, out].

    Args:
        in_features: Input dimension.
        out_features: Number of centres (units).
        center_std: Centres are drawn from N(0, center_std^2) (data standardised to unit
            variance puts them among the data).
    """

    def __init__(self, in_features: int, out_features: int, center_std: float = 1.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.center_std = center_std
        self.centers = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.centers, 0.0, self.center_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SquaredDistance expects inputs with {self.in_features} features, got "
                f"shape {tuple(x.shape)}"
            )
        x2 = (x * x).sum(-1, keepdim=True)
        c2 = (self.centers * self.centers).sum(-1)
        return (x2 - 2.0 * x @ self.centers.t() + c2).clamp_min(0.0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class RBFKernel(nn.Module):
    """h_j = exp(-u_j / (2 s_j^2)) with learnable widths s_j = exp(log_width_j) > 0.

    The activation of an :class:`RBF` layer. ``signalprop_activation = "rbf"``: its derivative
    dh/du = -h / (2 s^2) is proportional to the output, so a unit far from every input (h ~ 0)
    passes no gradient, like a saturated sigmoid.

    Args:
        features: Number of units.
        width: Initial width s (the same for every unit).
    """

    signalprop_activation = "rbf"

    def __init__(self, features: int, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"RBF width must be > 0, got {width}")
        self.features = features
        self.log_width = nn.Parameter(torch.full((features,), math.log(width)))

    @property
    def width(self) -> torch.Tensor:
        return self.log_width.exp()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.exp(-u * torch.exp(-2.0 * self.log_width) / 2.0)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class RBF(nn.Module):
    """Radial-basis-function layer: h_j(x) = exp(-||x - c_j||^2 / (2 s_j^2)).

    Composed of ``distance`` (:class:`SquaredDistance`, the Euclidean-norm pre-activation
    u = ||x - c||^2), ``norm`` (``nn.Identity`` by default: the slot where
    :func:`signalprop.remedies.transforms.insert_norm` puts a batch or layer norm on the distance)
    and ``kernel`` (:class:`RBFKernel`). Input [B, in] -> output [B, out].

    Args:
        in_features: Input dimension.
        out_features: Number of units.
        width: Initial kernel width s. The default sqrt(in_features) keeps u/(2 s^2) of order 1
            for standardised inputs and centres (E||x - c||^2 = 2 in_features).
        center_std: Standard deviation of the initial centres.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        width: float | None = None,
        center_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.distance = SquaredDistance(in_features, out_features, center_std)
        self.norm: nn.Module = nn.Identity()
        self.kernel = RBFKernel(out_features, math.sqrt(in_features) if width is None else width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(self.norm(self.distance(x)))


def nf_gain(phi: Callable[[torch.Tensor], torch.Tensor], points: int = 24001) -> float:
    """gamma = 1 / std(phi(z)), z ~ N(0, 1): the NFNets gain (Brock, De & Smith 2021, sec. 3).

    Integrated against the normal density with the trapezoid rule on ``points`` nodes in
    [-12, 12] in float64. A dense grid rather than Gauss-Hermite: activations with a kink
    (ReLU, hardtanh) make a Hermite rule converge slowly (0.4% off for ReLU with 101 nodes),
    while the trapezoid error at a kink is O(h^2) ~ 1e-6. Raises ``ValueError`` for a constant
    phi (std 0).
    """
    z = np.linspace(-12.0, 12.0, points)
    w = np.exp(-0.5 * z * z)
    w[0] *= 0.5
    w[-1] *= 0.5
    w /= w.sum()
    with torch.no_grad():
        v = phi(torch.as_tensor(z, dtype=torch.float64)).double().numpy()
    mean = float(np.dot(w, v))
    var = float(np.dot(w, (v - mean) ** 2))
    if not math.isfinite(var) or var <= 1e-20:
        raise ValueError("activation has zero variance under N(0, 1) inputs: no NF gain exists")
    return 1.0 / math.sqrt(var)


class Scaled(nn.Module):
    """a * phi(z): a fixed or learnable gain on an activation.

    ``phi`` is kept as a child module, so the probe measures its (unscaled) output with the
    right saturation rule; ``Scaled`` itself declares no activation kind.

    Args:
        phi: An activation module or a canonical activation name.
        a: The gain, or ``"nf"`` for 1/std(phi(z)), z ~ N(0, 1) (Brock et al. 2021).
        learnable: Make ``a`` a trainable parameter.
    """

    def __init__(self, phi: nn.Module | str, a: float | str = "nf", learnable: bool = False):
        super().__init__()
        self.phi = make_activation(phi) if isinstance(phi, str) else phi
        if not isinstance(self.phi, nn.Module):
            raise TypeError(f"phi must be an nn.Module or a name, got {type(phi).__name__}")
        if isinstance(a, str):
            if a != "nf":
                raise ValueError(f"gain a must be a number or 'nf', got {a!r}")
            # rrelu is random in training mode; its eval mode is the deterministic mean slope
            was = self.phi.training
            self.phi.eval()
            # evaluate where phi's own tensors live (a learnable activation may be on a GPU)
            t = next(iter([*self.phi.parameters(), *self.phi.buffers()]), None)
            phi = self.phi
            a = nf_gain(phi if t is None else lambda z: phi(z.to(t.device, t.dtype)).cpu())
            self.phi.train(was)
        a_t = torch.tensor(float(a))
        if learnable:
            self.a = nn.Parameter(a_t)
        else:
            self.register_buffer("a", a_t)
        self.learnable = learnable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * self.phi(x)

    def extra_repr(self) -> str:
        return f"a={float(self.a):.4g}, learnable={self.learnable}"


#: The buildable activations: the ``nn.Module`` face of the vocabulary (aliases included).
ACTIVATIONS: Registry = VOCAB.derive(lambda e: e.fn.module)


def make_activation(name: str, **overrides: object) -> nn.Module:
    """Build the registered activation ``name`` (``ValueError`` listing valid names if unknown)."""
    return ACTIVATIONS.build(name, **overrides)


def is_activation(module: nn.Module) -> bool:
    """True for a module this package recognises as an activation (``Scaled`` included)."""
    return isinstance(module, Scaled) or activation_kind(module) is not None


def check_activation_name(name: str) -> str:
    """The canonical spelling of an activation name or alias (``ValueError`` if unknown)."""
    return ACTIVATIONS.canonical(name)
