"""Dynamical isometry: the spectrum of the input-output Jacobian (Pennington, Schoenholz &
Ganguli 2017, "Resurrecting the sigmoid in deep learning through dynamical isometry").

For x^l = phi(h^l), h^l = W^l x^{l-1} + b^l, the Jacobian J = dx^L/dx^0 = prod_l D^l W^l with
D^l = diag(phi'(h^l)). In the infinite-width limit the squared singular values lambda of J (the
eigenvalues of J J^T) have, by free multiplicative convolution (S-transforms multiply),

    mean   m_1 = prod_l sigma_w^2 mu_1^l                   ( = (sigma_w^2 mu_1)^L = chi_1^L )
    var / m_1^2 = sum_l (mu_2^l / (mu_1^l)^2 - 1 - s_1)     ( = L (mu_2/mu_1^2 - 1 - s_1) )

with mu_k^l = E[phi'(sqrt(q^l) z)^(2k)] and s_1 the first S-transform coefficient of W^T W / sigma_w^2:
s_1 = 0 for orthogonal weights (all singular values 1) and s_1 = -1 for Gaussian weights
(Marchenko-Pastur, variance 1). At criticality (chi_1 = 1) this is the paper's
sigma_JJ^T^2 = L (mu_2/mu_1^2 - 1 - s_1). ReLU has mu_1 = mu_2 = 1/2, so the variance grows like L
(2L with Gaussian weights) for any weights: no isometry. tanh at q* -> 0 has mu_2/mu_1^2 -> 1, so
orthogonal weights give variance -> 0: dynamical isometry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from signalprop.theory.activations import Activation, get_activation
from signalprop.theory.meanfield import q_star
from signalprop.theory.quadrature import gaussian_expectations

ActivationSpec = str | Activation | Callable[..., Any]


def s_1(orthogonal: bool) -> float:
    """First S-transform coefficient of W^T W / sigma_w^2: 0 orthogonal, -1 Gaussian."""
    return 0.0 if orthogonal else -1.0


def derivative_moments(activation: ActivationSpec, q: float | np.ndarray) -> np.ndarray:
    """[mu_1, mu_2] = [E phi'(x)^2, E phi'(x)^4], x ~ N(0, q); shape [2, *q.shape]."""
    act = get_activation(activation)

    def g(x: np.ndarray) -> np.ndarray:
        d2 = act.dphi(x) ** 2
        return np.stack([d2, d2 * d2])

    return gaussian_expectations(g, q, kinks=act.kinks)


def jacobian_moments(
    activation: ActivationSpec,
    sigma_w2: float,
    depth: int,
    *,
    sigma_b2: float = 0.0,
    orthogonal: bool = False,
    q: float | Sequence[float] | np.ndarray | None = None,
) -> dict[str, float]:
    """Mean and variance of the squared singular values of the input-output Jacobian.

    Args:
        activation: Activation spec.
        sigma_w2: Weight variance.
        depth: Number of layers L.
        sigma_b2: Bias variance (used only to find q* when ``q`` is not given).
        orthogonal: Orthogonal (s_1 = 0) or Gaussian (s_1 = -1) weights.
        q: The pre-activation variance of every layer (a scalar: the same for all; a sequence of
            length ``depth``: layer by layer, for networks still approaching q*); default q*.

    Returns:
        Dict with ``mean`` (m_1), ``variance`` (m_2 - m_1^2), ``normalized_variance``
        (variance / mean^2), ``mu_1``, ``mu_2`` (of the last layer) and ``s_1``.
    """
    if depth < 1 or int(depth) != depth:
        raise ValueError(f"depth must be a positive integer, got {depth}")
    act = get_activation(activation)
    if q is None:
        q = q_star(act, sigma_w2, sigma_b2)
        if not math.isfinite(q):
            raise ValueError("q* diverges at these sigmas: pass the per-layer variances q")
    qs = np.asarray(q, dtype=np.float64)
    if qs.ndim == 0:
        qs = np.full(int(depth), float(qs))
    if qs.shape != (int(depth),):
        raise ValueError(f"q must be a scalar or have length depth={depth}, got shape {qs.shape}")
    mu = derivative_moments(act, qs)
    mu1, mu2 = mu[0], mu[1]
    s1 = s_1(orthogonal)
    log_mean = float(np.sum(np.log(sigma_w2 * mu1)))
    norm_var = float(np.sum(mu2 / mu1**2 - 1.0 - s1))
    mean = math.exp(log_mean)
    return {
        "mean": mean,
        "variance": norm_var * mean * mean,
        "normalized_variance": norm_var,
        "mu_1": float(mu1[-1]),
        "mu_2": float(mu2[-1]),
        "s_1": s1,
    }
