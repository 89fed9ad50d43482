"""Thin PyTorch bridge: initialise models on the edge of chaos, and hold the theory against
measurements on wide random networks.

- :func:`critical_` initialises every ``nn.Linear`` / ``nn.Conv*d`` in place with
  W ~ N(0, sigma_w^2 / fan_in) (or a scaled orthogonal matrix) and b ~ N(0, sigma_b^2) at the
  critical sigma_w of :func:`signalprop.theory.critical_point`.
- :func:`measure_gradient_profile` builds a wide random MLP (optionally with batch norm), measures
  the per-layer ratios of squared gradient norms ||dL/dh^l||^2 / ||dL/dh^{l+1}||^2 and the
  input-output Jacobian's spectrum, and returns them beside the mean-field predictions.

The mathematics stays in NumPy (:mod:`signalprop.theory`); this module only builds and runs
networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from signalprop.theory.activations import ACTIVATIONS, Activation, get_activation
from signalprop.theory.batchnorm import bn_gradient_rate
from signalprop.theory.isometry import jacobian_moments
from signalprop.theory.meanfield import CriticalPoint, critical_point, gradient_profile
from signalprop.vocab.activations import infer_activation

ActivationSpec = str | Activation | Callable[..., Any]

# torch versions of the registered activations, by name (hyper-parameters from Activation.hparams)
_TORCH_FNS: dict[str, Callable[..., Callable[[torch.Tensor], torch.Tensor]]] = {
    "linear": lambda: (lambda x: x),
    "relu": lambda: torch.relu,
    "leaky_relu": lambda negative_slope=0.01: (
        lambda x: torch.nn.functional.leaky_relu(x, negative_slope)
    ),
    "elu": lambda alpha=1.0: (lambda x: torch.nn.functional.elu(x, alpha)),
    "selu": lambda: torch.selu,
    "gelu": lambda: torch.nn.functional.gelu,
    "silu": lambda: torch.nn.functional.silu,
    "softplus": lambda: torch.nn.functional.softplus,
    "sigmoid": lambda: torch.sigmoid,
    "tanh": lambda: torch.tanh,
    "softsign": lambda: torch.nn.functional.softsign,
    "hardtanh": lambda: torch.nn.functional.hardtanh,
    "erf": lambda: torch.erf,
    "gaussian": lambda: (lambda x: torch.exp(-0.5 * x * x)),
    "sin": lambda: torch.sin,
}

# nn.Module classes whose default configuration is a registered activation
_MODULE_NAMES: tuple[tuple[type[nn.Module], str, tuple[str, ...]], ...] = (
    (nn.Tanh, "tanh", ()),
    (nn.Sigmoid, "sigmoid", ()),
    (nn.ReLU, "relu", ()),
    (nn.LeakyReLU, "leaky_relu", ("negative_slope",)),
    (nn.ELU, "elu", ("alpha",)),
    (nn.SELU, "selu", ()),
    (nn.SiLU, "silu", ()),
    (nn.Softsign, "softsign", ()),
    (nn.Identity, "linear", ()),
)


class _Lambda(nn.Module):
    """An element-wise function as a module (so that networks print and move to devices)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def resolve_activation(spec: ActivationSpec | nn.Module) -> Activation:
    """Like :func:`signalprop.theory.get_activation`, but a default-configured torch activation
    module (``nn.Tanh()``, ``nn.LeakyReLU(0.2)``, ...) maps to its registered name so the theory
    uses exact derivatives; a module with a custom signalprop name (``signalprop_activation``)
    maps likewise; any other module is used as a callable."""
    if isinstance(spec, nn.Module):
        custom = getattr(spec, "signalprop_activation", None)
        if isinstance(custom, str) and custom in ACTIVATIONS:
            return get_activation(custom)
        if isinstance(spec, nn.GELU) and spec.approximate == "none":
            return get_activation("gelu")
        if isinstance(spec, nn.Hardtanh) and (spec.min_val, spec.max_val) == (-1.0, 1.0) and \
                type(spec) is nn.Hardtanh:
            return get_activation("hardtanh")
        if isinstance(spec, nn.Softplus) and spec.beta == 1.0:
            return get_activation("softplus")
        for cls, name, hp in _MODULE_NAMES:
            if type(spec) is cls:
                return get_activation(name, **{k: float(getattr(spec, k)) for k in hp})
    return get_activation(spec)


def torch_activation(spec: ActivationSpec | nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch function computing the activation (for building networks).

    Raises:
        TypeError: the activation is a NumPy-only callable (it cannot run inside a network).
    """
    if isinstance(spec, nn.Module):
        return spec
    act = resolve_activation(spec)
    if act.source is not None:
        if act.derivative == "finite-difference":
            raise TypeError(
                f"activation {act.name!r} is a NumPy function; networks need a torch callable "
                "(e.g. torch.tanh or an nn.Module)"
            )
        return act.source
    return _TORCH_FNS[act.name](**act.hparams)


def _fan_in(module: nn.Module) -> int:
    w = module.weight
    if isinstance(module, nn.Linear):
        return int(w.shape[1])
    return int(w.shape[1] * math.prod(w.shape[2:]))  # conv: in_channels/groups * kernel size


def _orthogonal(rows: int, cols: int, generator: torch.Generator | None) -> torch.Tensor:
    """A [rows, cols] matrix with orthonormal rows (rows <= cols) or columns (Saxe et al. 2013)."""
    a = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    qm, r = torch.linalg.qr(a)
    qm = qm * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar measure (Mezzadri 2007)
    return qm if rows >= cols else qm.t()


@torch.no_grad()
def mean_field_init_(
    model: nn.Module,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    *,
    orthogonal: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """W ~ N(0, sigma_w^2 / fan_in), b ~ N(0, sigma_b^2) for every Linear and Conv layer, in place.

    With ``orthogonal=True`` W is a random (semi-)orthogonal matrix (flattened to
    [out, fan_in] for convolutions) scaled so that E||W x||^2 / fan_out = sigma_w^2 ||x||^2 / fan_in,
    as with Gaussian weights: gain sqrt(sigma_w^2 max(1, fan_out / fan_in)).

    Returns:
        ``model`` (initialised in place).
    """
    if not (math.isfinite(sigma_w2) and sigma_w2 > 0):
        raise ValueError(f"sigma_w2 must be finite and > 0, got {sigma_w2}")
    if not (math.isfinite(sigma_b2) and sigma_b2 >= 0):
        raise ValueError(f"sigma_b2 must be finite and >= 0, got {sigma_b2}")
    found = 0
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        found += 1
        w = m.weight
        fan_in = _fan_in(m)
        fan_out = int(w.shape[0])
        if orthogonal:
            q = _orthogonal(fan_out, fan_in, generator)
            gain = math.sqrt(sigma_w2 * max(1.0, fan_out / fan_in))
            new = (gain * q).reshape(w.shape)
        else:
            # float32 sampling is ~4x faster than float64 on CPU and plenty for an init
            gdt = torch.float64 if w.dtype == torch.float64 else torch.float32
            new = torch.randn(w.shape, generator=generator, dtype=gdt)
            new *= math.sqrt(sigma_w2 / fan_in)
        w.copy_(new.to(w.dtype))
        if m.bias is not None:
            b = torch.randn(m.bias.shape, generator=generator, dtype=torch.float64)
            m.bias.copy_((b * math.sqrt(sigma_b2)).to(m.bias.dtype))
    if found == 0:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv layers to initialise")
    return model


def critical_(
    model: nn.Module,
    activation: ActivationSpec | nn.Module | None = None,
    sigma_b2: float = 0.0,
    *,
    orthogonal: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Initialise ``model`` in place on the edge of chaos (chi_1 = 1) for its activation.

    Every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` gets W ~ N(0, sigma_w^2 / fan_in) (orthogonal with
    ``orthogonal=True``, as in Pennington et al. 2017) and b ~ N(0, sigma_b^2), with sigma_w^2
    from :func:`signalprop.theory.critical_point` (Schoenholz et al. 2017).

    Args:
        model: The network.
        activation: Activation spec or module; default: inferred from the model's activation
            modules (via :func:`signalprop.remedies.activations.infer_activation`).
        sigma_b2: Bias variance.
        orthogonal: Orthogonal instead of Gaussian weights.
        generator: Optional ``torch.Generator`` for reproducibility.

    Returns:
        ``model``.

    Raises:
        NoCriticalPoint: the activation has no critical point at this sigma_b^2 (the message
            says why).

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 1))
        >>> critical_(net, "tanh", sigma_b2=0.05)  # doctest: +ELLIPSIS
        Sequential(...)
    """
    if activation is None:
        activation = infer_activation(model)
    cp = critical_point(resolve_activation(activation), sigma_b2)
    return mean_field_init_(model, cp.sigma_w2, sigma_b2, orthogonal=orthogonal,
                            generator=generator)


def build_mlp(
    activation: ActivationSpec | nn.Module,
    width: int,
    depth: int,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    *,
    batch_norm: bool = False,
    orthogonal: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """``depth`` blocks of [Linear(width, width), (BatchNorm1d), activation], mean-field initialised.

    With ``batch_norm=True`` the Linear layers have no bias (BN removes it) and BN sits before the
    activation, as in Yang et al. 2019.
    """
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be >= 1, got {width}, {depth}")
    fn = torch_activation(activation)
    name = resolve_activation(activation).name
    layers: list[nn.Module] = []
    for _ in range(depth):
        # built on the meta device: torch's default init would be thrown away anyway
        layers.append(nn.Linear(width, width, bias=not batch_norm, device="meta"))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(fn if isinstance(fn, nn.Module) else _Lambda(fn, name))
    net = nn.Sequential(*layers)
    for m in net:
        if isinstance(m, nn.Linear):
            m.to_empty(device="cpu")
    mean_field_init_(net, sigma_w2, sigma_b2, orthogonal=orthogonal, generator=generator)
    return net


@dataclass
class GradientProfile:
    """Measured per-layer gradient statistics of a random network beside the theory.

    Layers are numbered 1..L; ``h^l`` is the output of the l-th Linear layer (pre-activation).

    Attributes:
        grad_sq_norms: ||dL/dh^l||^2 summed over the batch, [L].
        ratios: grad_sq_norms[l] / grad_sq_norms[l+1], [L-1] (growth towards the input).
        predicted_ratios: Mean-field prediction of each ratio, [L-1]: sigma_w^2 E[phi'^2](q^l) with
            q^l iterated from q_in by the length map (= chi_1 at the fixed point); for BN
            networks the constant lambda_G (:func:`signalprop.theory.bn_gradient_rate`).
        q_measured: Mean of (h^l)^2 over batch and units, [L].
        q_predicted: The length map's q^l from q_in, [L] (NaN for BN networks).
        measured_rate: Geometric mean of ``ratios`` over ``rate_layers``.
        predicted_rate: Geometric mean of ``predicted_ratios`` over the same layers.
        rate_layers: (first, last) ratio indices (0-based, inclusive) used for the rates (BN
            networks skip the first layers, where the batch Gram matrix is still converging to
            its fixed point, and the last one).
        flatness: grad_sq_norms[0] / grad_sq_norms[-1] (1 = perfectly flat).
        jacobian_sq_singular_values: Squared singular values of dx^L/dx^0 for the first input
            (None unless asked for).
        jacobian_measured, jacobian_predicted: Dicts with ``mean`` and ``variance`` of those
            squared singular values (measured; Pennington et al. 2017 prediction).
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    depth: int
    width: int
    batch_size: int
    batch_norm: bool
    orthogonal: bool
    q_in: float
    grad_sq_norms: np.ndarray
    ratios: np.ndarray
    predicted_ratios: np.ndarray
    q_measured: np.ndarray
    q_predicted: np.ndarray
    measured_rate: float
    predicted_rate: float
    rate_layers: tuple[int, int]
    flatness: float
    jacobian_sq_singular_values: np.ndarray | None = None
    jacobian_measured: dict[str, float] = field(default_factory=dict)
    jacobian_predicted: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (arrays as lists)."""
        d = asdict(self)
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def limit_input_variance(
    activation: ActivationSpec, sigma_w2: float, depth: int, tolerance: float = 1.25
) -> float:
    """Input variance for a network at a "limit q* -> 0" critical point (tanh, erf, ... at
    sigma_b = 0): the largest q_in in 1e-2, 1e-3, ..., 1e-8 whose *predicted* squared-gradient
    change over ``depth`` layers is within a factor ``tolerance``.

    There the variance decays to 0 only polynomially and chi_1(q^l) < 1 by O(q^l) (O(sqrt(q^l))
    for kinked phi' such as softsign or elu), so the gradient stays flat over a given depth only
    if the input variance is small enough; the length map says how small.
    """
    cands = 10.0 ** -np.arange(2, 9)
    _, r = gradient_profile(activation, sigma_w2, 0.0, cands, depth)
    change = np.exp(np.abs(np.sum(np.log(r), axis=0)))
    ok = np.flatnonzero(change <= tolerance)
    return float(cands[ok[0]]) if ok.size else float(cands[-1])


def _profile_variances(act: Activation, sigma_w2: float | None, sigma_b2: float,
                       q_in: float | None, depth: int, batch_size: int, batch_norm: bool
                       ) -> tuple[float, float, float]:
    """sigma_w^2, sigma_b^2 and q_in of :func:`measure_gradient_profile` with its defaults."""
    cp: CriticalPoint | None = None
    if batch_norm:
        if batch_size < 4:
            raise ValueError(f"batch norm needs batch_size >= 4, got {batch_size}")
        sigma_w2 = 1.0 if sigma_w2 is None else sigma_w2  # BN is invariant to the scale of W
        sigma_b2 = 0.0
    elif sigma_w2 is None:
        cp = critical_point(act, sigma_b2)
        sigma_w2 = cp.sigma_w2
    if q_in is None:
        if cp is None or not math.isfinite(cp.q_star):
            q_in = 1.0
        elif cp.q_star == 0.0:
            q_in = limit_input_variance(act, cp.sigma_w2, depth)
        else:
            q_in = cp.q_star
    return sigma_w2, sigma_b2, q_in


def _backprop_sq_norms(net: nn.Sequential, fn: Callable[[torch.Tensor], torch.Tensor],
                       q_in: float, batch_size: int, width: int, gen: torch.Generator,
                       batch_norm: bool, device: str | torch.device, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """One forward/backward of L = sum(V * x^L): the input x^0, ||dL/dh^l||^2 and the measured
    q^l = mean((h^l)^2) of every Linear output h^l."""
    # inputs are drawn on the CPU (reproducible for a seed on any device), then moved
    h0 = torch.randn(batch_size, width, generator=gen, dtype=torch.float64)
    v = torch.randn(batch_size, width, generator=gen, dtype=torch.float64)
    h0 = h0.to(device=device, dtype=dtype)
    v = v.to(device=device, dtype=dtype)
    with torch.no_grad():
        x0 = h0 if batch_norm else fn(math.sqrt(q_in) * h0)

    hs: list[torch.Tensor] = []
    x = x0
    with torch.enable_grad():
        for m in net:
            x = m(x)
            if isinstance(m, nn.Linear):
                x.retain_grad()
                hs.append(x)
        loss = (v * x).sum()
        loss.backward()
    g2 = np.array([float(h.grad.double().pow(2).sum()) for h in hs])
    qm = np.array([float(h.detach().double().pow(2).mean()) for h in hs])
    return x0, g2, qm


# long: 14 documented arguments take 45 of its lines; the body is ~35 (set up, measure, compare)
def measure_gradient_profile(
    activation: ActivationSpec | nn.Module,
    sigma_w2: float | None = None,
    sigma_b2: float = 0.0,
    *,
    depth: int = 50,
    width: int = 512,
    batch_size: int = 32,
    q_in: float | None = None,
    batch_norm: bool = False,
    orthogonal: bool = False,
    jacobian: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GradientProfile:
    """Measure squared-gradient-norm ratios (and optionally the Jacobian spectrum) of a wide random
    MLP and return them beside the mean-field predictions.

    The network is :func:`build_mlp`; the input is x^0 = phi(h^0), h^0 ~ N(0, q_in) i.i.d. (so that
    h^1 has the variance q-map(q_in), and q_in = q* starts on the fixed point); for BN networks
    x^0 ~ N(0, 1). The loss is L = sum(V * x^L) with V ~ N(0, 1) independent per example and unit,
    so dL/dx^L is isotropic (a loss constant over the batch would be projected out by BN).

    Args:
        activation: Activation spec or module.
        sigma_w2: Weight variance; default the critical one at ``sigma_b2``
            (:func:`signalprop.theory.critical_point`; raises ``NoCriticalPoint`` if none).
        sigma_b2: Bias variance (ignored with batch norm).
        depth, width, batch_size: Network and batch shape.
        q_in: Input pre-activation variance; default q* of the critical point (1e-3 when the
            critical point is the limit q* -> 0, 1 when every q is a fixed point), else 1.
        batch_norm: Insert BatchNorm1d before every activation (Yang et al. 2019).
        orthogonal: Orthogonal weights.
        jacobian: Also compute the input-output Jacobian's squared singular values (float64,
            for the first input of the batch).
        seed: Seed of the weights, inputs and V.
        device, dtype: Where and in which precision to run.

    Returns:
        A :class:`GradientProfile`.
    """
    act = resolve_activation(activation)
    if depth < 2:
        raise ValueError(f"depth must be >= 2 to measure ratios, got {depth}")
    sigma_w2, sigma_b2, q_in = _profile_variances(act, sigma_w2, sigma_b2, q_in, depth,
                                                  batch_size, batch_norm)
    gen = torch.Generator().manual_seed(seed)
    net = build_mlp(activation, width, depth, sigma_w2, sigma_b2, batch_norm=batch_norm,
                    orthogonal=orthogonal, generator=gen)
    net = net.to(device=device, dtype=dtype)
    net.train()
    x0, g2, qm = _backprop_sq_norms(net, torch_activation(activation), q_in, batch_size, width,
                                    gen, batch_norm, device, dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = g2[:-1] / g2[1:]

    qp, pred, first, last = _predicted_profile(act, sigma_w2, sigma_b2, q_in, depth, batch_size,
                                               batch_norm)
    sel = slice(first, last + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        measured_rate = float(np.exp(np.mean(np.log(ratios[sel]))))
        predicted_rate = float(np.exp(np.mean(np.log(pred[sel]))))

    prof = GradientProfile(
        activation=act.name, sigma_w2=float(sigma_w2), sigma_b2=float(sigma_b2), depth=depth,
        width=width, batch_size=batch_size, batch_norm=batch_norm, orthogonal=orthogonal,
        q_in=float(q_in), grad_sq_norms=g2, ratios=ratios, predicted_ratios=pred,
        q_measured=qm, q_predicted=qp, measured_rate=measured_rate,
        predicted_rate=predicted_rate, rate_layers=(first, last),
        flatness=float(g2[0] / g2[-1]),
    )
    if jacobian:
        if batch_norm:
            raise ValueError("the Jacobian spectrum is for networks without batch norm")
        _add_jacobian(prof, act, net, x0[:1], orthogonal)
    return prof


def _predicted_profile(act: Activation, sigma_w2: float, sigma_b2: float, q_in: float,
                       depth: int, batch_size: int, batch_norm: bool
                       ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The mean-field q^l and gradient ratios, and the layers (first, last) whose ratios make
    the rate (with batch norm: Yang et al.'s rate, away from both ends)."""
    if batch_norm:
        pred = np.full(depth - 1, bn_gradient_rate(act, batch_size))
        first, last = min(5, depth - 2), depth - 3 if depth >= 8 else depth - 2
        return np.full(depth, np.nan), pred, first, last
    qp, pred = gradient_profile(act, sigma_w2, sigma_b2, q_in, depth)
    return qp, pred, 0, depth - 2


def _add_jacobian(prof: GradientProfile, act: Activation, net: nn.Module, x: torch.Tensor,
                  orthogonal: bool) -> None:
    """The Jacobian's squared singular values at ``x``, their moments and the predicted ones."""
    s2 = jacobian_sq_singular_values(net, x)
    prof.jacobian_sq_singular_values = s2
    prof.jacobian_measured = {"mean": float(s2.mean()), "variance": float(s2.var())}
    pm = jacobian_moments(act, prof.sigma_w2, prof.depth, orthogonal=orthogonal,
                          q=prof.q_predicted)
    prof.jacobian_predicted = {"mean": pm["mean"], "variance": pm["variance"]}


@torch.no_grad()
def jacobian_sq_singular_values(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Squared singular values of the input-output Jacobian d model(x) / dx at one input.

    Args:
        model: Maps [1, n_in] -> [1, n_out].
        x: One input, shape [1, n_in] (or [n_in]).

    Returns:
        Float64 array of min(n_in, n_out) values, sorted descending.
    """
    x = x.reshape(1, -1).detach().to(torch.float64)
    m64 = _as_float64(model)
    with torch.enable_grad():
        jac = torch.func.jacrev(lambda t: m64(t.unsqueeze(0)).squeeze(0))(x.squeeze(0))
    return (torch.linalg.svdvals(jac) ** 2).cpu().numpy()


def _as_float64(model: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(model).to(torch.float64)
    m.eval()
    return m
