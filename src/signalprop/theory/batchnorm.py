"""Gradient explosion in deep batch-normalised networks at initialisation (Yang et al. 2019).

Network (no skips): h^l = W^l x^{l-1}, x^l = phi(BN(h^l)), BN over a batch of B inputs (per unit:
subtract the batch mean, divide by the batch standard deviation; gamma = 1, beta = 0 at init).
BN makes the network invariant to the scale of W, so sigma_w drops out.

Mean-field argument (Yang, Pennington, Rao, Sohl-Dickstein, Schoenholz, "A Mean Field Theory of
Batch Normalization", ICLR 2019): the B x B Gram matrix of the pre-activations converges to a
permutation-symmetric ("BSB1") fixed point, at which the centred pre-activation of a unit over the
batch is an isotropic Gaussian in the (B-1)-dimensional subspace 1^perp. So the BN output
z = sqrt(B) u with u uniform on the unit sphere of 1^perp, independent of the batch standard
deviation sigma, and sigma^2 ~ (scale) chi^2_{B-1} / B. Backward, the per-unit gradient over the
batch is dL/dh = (1/sigma) P D W^T dL/dh^{l+1}, with P = G - u u^T (BN's Jacobian: G = I - 11^T/B
removes the mean, u u^T the scale) and D = diag(phi'(z)). Under gradient independence the B x B
gradient covariance Pi evolves linearly, and permutation symmetry makes its trace (the squared
gradient norm, summed over the batch) grow by exactly

    lambda_G = B E[tr(P D G D P)] / ((B - 3) E||G phi(z)||^2)

per layer (E[1/chi^2_{B-1}] = 1/(B-3) supplies the pole at B = 3). For phi = id this is
(B-2)/(B-3); for ReLU it has the closed form of
:func:`signalprop.theory.closed_forms.bn_gradient_rate_relu`, tending to pi/(pi-1). Other
activations are integrated numerically here over the exact one- and two-coordinate marginals of
the uniform distribution on the sphere (Gauss-Jacobi in the radius, Gauss-Legendre in the angle,
split where z1 or z2 crosses 0), or estimated by Monte Carlo over z (:func:`bn_gradient_rate_mc`,
an independent check). Every non-linear activation gives lambda_G > 1 (Yang et al. Theorem: BN
itself causes the explosion; only the width of the batch and approaching linearity reduce it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import special

from signalprop.theory.activations import Activation, get_activation
from signalprop.theory.closed_forms import (
    _check_batch,
    bn_gradient_rate_linear,
    bn_gradient_rate_relu,
)

ActivationSpec = str | Activation | Callable[..., Any]

_CLOSED = {"relu": bn_gradient_rate_relu, "linear": bn_gradient_rate_linear}


def _jacobi(m: int, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    x, w = special.roots_jacobi(m, alpha, beta)
    return x, w / w.sum()


def _sphere_pair_expectations(act: Activation, b: int, order: int) -> dict[str, float]:
    """Single- and two-coordinate expectations for z = sqrt(B) u, u uniform on S(1^perp)."""
    n = b - 1  # dimension of 1^perp
    scale = math.sqrt(b - 1.0)  # z_i = sqrt(B) u_i and u_i = sqrt(1 - 1/B) <u, f_i>
    # one coordinate: v = <u, f1> has density ~ (1 - v^2)^((n-3)/2)
    v, wv = _jacobi(order, (n - 3) / 2.0, (n - 3) / 2.0)
    z1 = scale * v
    p1, d1 = act.phi(z1), act.dphi(z1)
    u1 = z1 / math.sqrt(b)
    out = {
        "p2": float(wv @ (p1 * p1)),
        "d2": float(wv @ (d1 * d1)),
        "d2u2": float(wv @ (d1 * d1 * u1 * u1)),
    }
    # two coordinates: projection of u on span(f1, f2) has density ~ (1 - r^2)^((n-4)/2) on the
    # disk; s = r^2 has density ~ (1 - s)^((n-4)/2); the angle is uniform
    t, wt = _jacobi(order, (n - 4) / 2.0, 0.0)
    r = np.sqrt((1.0 + t) / 2.0)
    rho = -1.0 / (b - 1.0)  # <f1, f2>
    th0 = math.acos(rho)
    # split the angle where z1 = 0 (theta = +-pi/2) or z2 = 0 (theta = th0 +- pi/2): exact for
    # the kinks of the ReLU family
    cuts = np.sort(np.mod([math.pi / 2, 3 * math.pi / 2, th0 + math.pi / 2, th0 - math.pi / 2],
                          2 * math.pi))
    cuts = np.concatenate([cuts, [cuts[0] + 2 * math.pi]])
    g, gw = np.polynomial.legendre.leggauss(order)
    thetas, tw = [], []
    for a, c in zip(cuts[:-1], cuts[1:], strict=True):
        thetas.append(0.5 * (a + c) + 0.5 * (c - a) * g)
        tw.append(0.5 * (c - a) * gw / (2 * math.pi))
    th = np.concatenate(thetas)
    wth = np.concatenate(tw)
    za = scale * r[:, None] * np.cos(th)[None, :]
    zb = scale * r[:, None] * np.cos(th - th0)[None, :]
    w2 = wt[:, None] * wth[None, :]
    pa, pb = act.phi(za), act.phi(zb)
    da, db = act.dphi(za), act.dphi(zb)
    sb = math.sqrt(b)
    out["pp"] = float(np.sum(w2 * pa * pb))
    out["dd"] = float(np.sum(w2 * da * db))
    out["dudu"] = float(np.sum(w2 * da * (za / sb) * db * (zb / sb)))
    return out


def _rate_from_expectations(e: dict[str, float], b: int) -> float:
    bb = float(b)
    tr_mg = bb * e["d2"] * (1.0 - 2.0 / bb) + (bb * e["d2"] + bb * (bb - 1) * e["dd"]) / bb**2
    u_m_u = bb * e["d2u2"] - (bb * e["d2u2"] + bb * (bb - 1) * e["dudu"]) / bb
    gphi = (bb - 1) * (e["p2"] - e["pp"])
    if gphi <= 0:
        raise ValueError("phi(z) is constant over the batch: batch norm of its output is undefined")
    return bb * (tr_mg - u_m_u) / ((bb - 3) * gphi)


def bn_gradient_rate(
    activation: ActivationSpec, batch_size: int, *, method: str = "auto", order: int = 96
) -> float:
    """Per-layer growth factor lambda_G of the squared gradient norm in a deep BN network.

    Args:
        activation: Activation spec.
        batch_size: B >= 4 (the rate has a pole at B = 3).
        method: ``"closed"`` (relu, linear only), ``"quadrature"`` (any phi; exact marginals of
            the sphere, see the module docstring), ``"auto"`` (closed form when there is one).
        order: Quadrature order per dimension.

    Returns:
        lambda_G (> 1 means gradients explode towards the input: ||dL/dh^l||^2 ~ lambda_G^(L-l)).

    Raises:
        ValueError: bad batch size or method, or a closed form asked for an activation without
            one.
    """
    b = int(_check_batch(batch_size))
    act = get_activation(activation)
    if method not in ("auto", "closed", "quadrature"):
        raise ValueError(f"method must be 'auto', 'closed' or 'quadrature', got {method!r}")
    if method in ("auto", "closed") and act.name in _CLOSED and not act.hparams:
        return _CLOSED[act.name](b)
    if method == "closed":
        raise ValueError(
            f"no closed-form BN gradient rate for {act.name!r} (closed forms: "
            f"{', '.join(sorted(_CLOSED))}); use method='quadrature'"
        )
    return _rate_from_expectations(_sphere_pair_expectations(act, b, order), b)


def bn_gradient_rate_mc(
    activation: ActivationSpec, batch_size: int, samples: int = 200_000, seed: int = 0
) -> tuple[float, float]:
    """Monte Carlo estimate of lambda_G over the BN output z (an independent check).

    Samples y ~ N(0, I_B), z = sqrt(B) G y / ||G y||, and averages tr(P D G D P) and
    ||G phi(z)||^2 (ratio of means, times B/(B-3)).

    Returns:
        (estimate, standard error by the delta method).
    """
    b = int(_check_batch(batch_size))
    act = get_activation(activation)
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((samples, b))
    w = y - y.mean(axis=1, keepdims=True)
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    z = math.sqrt(b) * u
    d = act.dphi(z)
    p = act.phi(z)
    d2 = d * d
    tr_mg = d2.sum(1) * (1 - 2.0 / b) + d.sum(1) ** 2 / b**2
    u_m_u = (d2 * u * u).sum(1) - (d * u).sum(1) ** 2 / b
    num = tr_mg - u_m_u
    den = ((p - p.mean(1, keepdims=True)) ** 2).sum(1)
    mn, md = num.mean(), den.mean()
    ratio = mn / md
    # delta-method standard error of a ratio of means
    var = (num.var() / md**2 + mn**2 * den.var() / md**4
           - 2 * mn * np.cov(num, den)[0, 1] / md**3) / samples
    k = b / (b - 3.0)
    return float(k * ratio), float(k * math.sqrt(max(var, 0.0)))
