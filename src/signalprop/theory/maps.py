"""The mean-field maps of a deep random network and their depth scales (see
:mod:`signalprop.theory.meanfield` for the model and the papers): the length map and its fixed
point q*, the correlation map and c*, chi_1 and chi_c, xi_q, xi_c and xi_grad.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import optimize

from signalprop.theory.activations import Activation, get_activation
from signalprop.theory.quadrature import bivariate_gaussian_expectation, gaussian_expectations

ActivationSpec = str | Activation | Callable[..., Any]

#: q above this counts as divergent (q* = inf); below Q_ZERO (with sigma_b = 0) as q* = 0.
Q_INF = 1e12
Q_ZERO = 1e-30

__all__ = [
    "Q_INF", "Q_ZERO", "ActivationSpec", "length_moments", "q_map", "q_map_slope", "q_star",
    "chi_1", "gradient_growth", "gradient_profile", "c_map", "chi_c", "c_star", "xi_q", "xi_c",
    "xi_grad",
]


def _check_sigmas(sigma_w2: float, sigma_b2: float) -> None:
    if not (math.isfinite(sigma_w2) and sigma_w2 > 0):
        raise ValueError(f"sigma_w2 must be finite and > 0, got {sigma_w2}")
    if not (math.isfinite(sigma_b2) and sigma_b2 >= 0):
        raise ValueError(f"sigma_b2 must be finite and >= 0, got {sigma_b2}")


def _stack_moments(act: Activation) -> Callable[[np.ndarray], np.ndarray]:
    """x -> [phi^2, phi'^2, x phi phi'] (one evaluation of phi and phi' for all three)."""

    def g(x: np.ndarray) -> np.ndarray:
        p = act.phi(x)
        d = act.dphi(x)
        return np.stack([p * p, d * d, x * p * d])

    return g


def length_moments(activation: ActivationSpec, q: float | np.ndarray) -> np.ndarray:
    """[E phi^2, E phi'^2, E x phi phi'] at x = sqrt(q) z, shape [3, *q.shape].

    The third gives the length map's slope without phi'': d/dq E[phi(x)^2] = E[x phi phi'] / q
    (Gaussian integration by parts, x ~ N(0, q)).
    """
    act = get_activation(activation)
    return gaussian_expectations(_stack_moments(act), q, kinks=act.kinks)


def q_map(
    activation: ActivationSpec, q: float | np.ndarray, sigma_w2: float, sigma_b2: float = 0.0
) -> np.ndarray:
    """Length map q -> sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2 (Poole et al. 2016, eq. 3).

    Args:
        activation: Activation spec (name, :class:`Activation` or callable).
        q: Pre-activation variance(s) of the previous layer, any shape.
        sigma_w2, sigma_b2: Weight and bias variances.

    Returns:
        Array shaped like q.
    """
    _check_sigmas(sigma_w2, sigma_b2)
    act = get_activation(activation)
    e = gaussian_expectations(lambda x: act.phi(x) ** 2, q, kinks=act.kinks)[0]
    return sigma_w2 * e + sigma_b2


def q_map_slope(
    activation: ActivationSpec, q: float | np.ndarray, sigma_w2: float, sigma_b2: float = 0.0
) -> np.ndarray:
    """d q-map / dq = sigma_w^2 E[x phi(x) phi'(x)] / q, x ~ N(0, q) (= chi_1 + sigma_w^2
    E[phi phi''], Schoenholz et al. 2017, eq. 4). At q = 0 the limit sigma_w^2 phi'(0)^2."""
    _check_sigmas(sigma_w2, sigma_b2)
    act = get_activation(activation)
    q = np.asarray(q, dtype=np.float64)
    m = length_moments(act, q)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(q > 0, m[2] / np.where(q > 0, q, 1.0), m[1])
    return sigma_w2 * slope


def q_star(
    activation: ActivationSpec,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    q0: float = 1.0,
    *,
    rtol: float = 1e-10,
    warmup: int = 30,
) -> float:
    """The fixed point q* of the length map reached from q^0 = q0.

    Iterates the map ``warmup`` times (to land in q0's basin), then brackets the root of
    q-map(q) - q in the direction the iteration moves and refines it with Brent's method, so that
    slow (marginal) convergence, e.g. q^l ~ 1/(2l) for tanh at sigma_w = 1, still gives the limit.

    Returns:
        q* (``0.0`` when the variance decays to 0, ``inf`` when it grows without bound).

    Example:
        >>> round(q_star("linear", 0.5, 1.0), 6)  # linear: q* = sigma_b^2 / (1 - sigma_w^2)
        2.0
    """
    _check_sigmas(sigma_w2, sigma_b2)
    if not (math.isfinite(q0) and q0 >= 0):
        raise ValueError(f"q0 must be finite and >= 0, got {q0}")
    act = get_activation(activation)

    def qmap(q: float) -> float:
        return float(q_map(act, q, sigma_w2, sigma_b2))

    q = q0
    for _ in range(warmup):
        qn = qmap(q)
        if not math.isfinite(qn) or qn > Q_INF:
            return math.inf
        if abs(qn - q) <= rtol * max(qn, 1e-300):
            return qn
        q = qn
        if q < Q_ZERO:
            return 0.0 if sigma_b2 == 0 else q

    return _bracketed_fixed_point(lambda x: qmap(x) - x, q, sigma_b2, rtol)


def _bracketed_fixed_point(f: Callable[[float], float], q: float, sigma_b2: float,
                           rtol: float) -> float:
    """The root of f(q) = q-map(q) - q found by stepping from ``q`` the way the map moves (by
    factors of 2) until the sign changes, then Brent's method; 0 or inf when it runs off."""
    fq = f(q)
    if fq == 0:
        return q
    step = 2.0 if fq > 0 else 0.5
    a = q
    for _ in range(400):
        b = a * step
        if b > Q_INF:
            return math.inf
        if b < Q_ZERO:
            return 0.0
        fb = f(b)
        if sigma_b2 == 0.0 and step < 1 and abs(fb) <= 1e-12 * b:
            # q-map(q) - q is below rounding: a flat approach to q* = 0 (e.g. tanh at sigma_w = 1,
            # where it is -2q^2); keep descending rather than accept a spurious root
            a = b
            continue
        if fb == 0:
            return b
        if (fb > 0) != (fq > 0):
            lo, hi = (a, b) if a < b else (b, a)
            return float(optimize.brentq(f, lo, hi, rtol=rtol, xtol=1e-300))
        a = b
    raise RuntimeError("q_star: no bracket found")  # pragma: no cover - 2^400 covers any range


def _resolve_q(act: Activation, sigma_w2: float, sigma_b2: float, q: float | None) -> float:
    if q is None:
        q = q_star(act, sigma_w2, sigma_b2)
    if math.isinf(q):
        q = Q_INF  # the limit q* -> infinity, evaluated at a very large variance
    if not q >= 0:
        raise ValueError(f"q must be >= 0, got {q}")
    return float(q)


def chi_1(
    activation: ActivationSpec, sigma_w2: float, sigma_b2: float = 0.0, q: float | None = None
) -> float:
    """chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2] (Poole et al. 2016, eq. 7).

    The per-layer growth factor of the squared gradient norm (Schoenholz et al. 2017).

    Args:
        activation: Activation spec.
        sigma_w2, sigma_b2: Weight and bias variances.
        q: Variance to evaluate at (default: q* from :func:`q_star`; if q* diverges, its limit,
            evaluated at q = 1e12).

    Example:
        >>> round(chi_1("relu", 2.0), 6)  # He's sigma_w^2 = 2 puts ReLU on the edge of chaos
        1.0
    """
    _check_sigmas(sigma_w2, sigma_b2)
    act = get_activation(activation)
    q = _resolve_q(act, sigma_w2, sigma_b2, q)
    e = gaussian_expectations(lambda x: act.dphi(x) ** 2, q, kinks=act.kinks)[0]
    return float(sigma_w2 * e)


def gradient_growth(
    activation: ActivationSpec, sigma_w2: float, sigma_b2: float = 0.0, q: float | None = None
) -> float:
    """Predicted per-layer ratio ||dL/dh^l||^2 / ||dL/dh^{l+1}||^2 of squared gradient norms.

    Equal to chi_1 in the mean-field limit (Schoenholz et al. 2017, eq. 10): the squared gradient
    norm grows (chi_1 > 1) or shrinks (chi_1 < 1) by this factor per layer towards the input.
    """
    return chi_1(activation, sigma_w2, sigma_b2, q)


def gradient_profile(
    activation: ActivationSpec,
    sigma_w2: float,
    sigma_b2: float,
    q_in: float | np.ndarray,
    depth: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean-field prediction of a depth-L network's variances and gradient ratios from q_in.

    q^1 = q-map(q_in), q^{l+1} = q-map(q^l); the squared-gradient ratio between layers l and l+1
    is r^l = sigma_w^2 E[phi'(sqrt(q^l) z)^2] (= chi_1 once q^l = q*). Vectorised over q_in.

    Returns:
        (q [L, *q_in.shape], r [L-1, *q_in.shape]).
    """
    _check_sigmas(sigma_w2, sigma_b2)
    if depth < 1 or int(depth) != depth:
        raise ValueError(f"depth must be a positive integer, got {depth}")
    act = get_activation(activation)
    q = np.asarray(q_in, dtype=np.float64)
    qs = []
    for _ in range(int(depth)):
        q = np.minimum(q_map(act, q, sigma_w2, sigma_b2), Q_INF)
        qs.append(q)
    qarr = np.stack(qs)
    d2 = gaussian_expectations(lambda x: act.dphi(x) ** 2, qarr[:-1], kinks=act.kinks)[0]
    return qarr, sigma_w2 * d2


def c_map(
    activation: ActivationSpec,
    c: float | np.ndarray,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    q: float | None = None,
    *,
    order: int = 16,
) -> np.ndarray:
    """Correlation map c -> (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q (Poole eq. 5).

    u1, u2 have variance q (default q*) and correlation c. Vectorised over c in [-1, 1].
    """
    _check_sigmas(sigma_w2, sigma_b2)
    act = get_activation(activation)
    q = _resolve_q(act, sigma_w2, sigma_b2, q)
    if q == 0:
        return np.ones_like(np.asarray(c, dtype=np.float64))
    e = bivariate_gaussian_expectation(lambda a, b: act.phi(a) * act.phi(b), q, q, c, order=order)
    return (sigma_w2 * e + sigma_b2) / q


def chi_c(
    activation: ActivationSpec,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    c: float | None = None,
    q: float | None = None,
) -> float:
    """chi_c = sigma_w^2 E[phi'(u1) phi'(u2)] at correlation c (default c*): the slope of the
    c-map there (Schoenholz et al. 2017, eq. 6). At c = 1 it equals chi_1."""
    _check_sigmas(sigma_w2, sigma_b2)
    act = get_activation(activation)
    q = _resolve_q(act, sigma_w2, sigma_b2, q)
    if c is None:
        c = c_star(act, sigma_w2, sigma_b2, q=q)
    if c >= 1.0:
        return chi_1(act, sigma_w2, sigma_b2, q)
    e = bivariate_gaussian_expectation(lambda a, b: act.dphi(a) * act.dphi(b), q, q, c)
    return float(sigma_w2 * e)


def c_star(
    activation: ActivationSpec,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    q: float | None = None,
    c0: float = 0.0,
    *,
    tol: float = 1e-10,
    warmup: int = 50,
) -> float:
    """Fixed point c* of the correlation map reached from c^0 = c0 (Poole et al. 2016).

    In the ordered phase (chi_1 < 1) c* = 1: inputs become perfectly correlated. In the chaotic
    phase c* < 1. Iterates, then brackets and refines like :func:`q_star`.
    """
    act = get_activation(activation)
    q = _resolve_q(act, sigma_w2, sigma_b2, q)
    if q == 0:
        return 1.0

    def cmap(c: float) -> float:
        return float(c_map(act, min(max(c, -1.0), 1.0), sigma_w2, sigma_b2, q))

    c = float(c0)
    for _ in range(warmup):
        cn = min(max(cmap(c), -1.0), 1.0)
        if abs(cn - c) <= tol:
            # the ordered phase approaches c* = 1 geometrically; report it as exactly 1
            return 1.0 if 1.0 - cn < 1e-7 else cn
        c = cn
    if 1.0 - c < 1e-6:
        return 1.0

    def f(x: float) -> float:
        return cmap(x) - x

    fc = f(c)
    if fc == 0:
        return c
    step = 1e-3
    a = c
    while True:
        b = min(a + step, 1.0) if fc > 0 else max(a - step, -1.0)
        if b >= 1.0:
            return 1.0
        fb = f(b)
        if (fb > 0) != (fc > 0) or fb == 0:
            lo, hi = (a, b) if a < b else (b, a)
            return float(optimize.brentq(f, lo, hi, xtol=tol)) if fb != 0 else b
        if b <= -1.0:
            return -1.0
        a, step = b, step * 2


def xi_q(activation: ActivationSpec, sigma_w2: float, sigma_b2: float = 0.0) -> float:
    """Depth scale of the approach of q^l to q*: -1/ln|q-map'(q*)| (Schoenholz eq. 4)."""
    act = get_activation(activation)
    q = _resolve_q(act, sigma_w2, sigma_b2, None)
    s = abs(float(q_map_slope(act, q, sigma_w2, sigma_b2)))
    return _depth(s)


def xi_c(activation: ActivationSpec, sigma_w2: float, sigma_b2: float = 0.0) -> float:
    """Depth scale of correlations, -1/ln chi_c at c* (Schoenholz et al. 2017, eq. 6).

    Diverges on the edge of chaos: signals stay distinguishable to depth ~ xi_c.
    """
    return _depth(abs(chi_c(activation, sigma_w2, sigma_b2)))


def xi_grad(activation: ActivationSpec, sigma_w2: float, sigma_b2: float = 0.0) -> float:
    """Gradient depth scale -1/ln chi_1 (Schoenholz et al. 2017, eq. 11).

    Positive: squared gradients vanish as exp(-l/xi_grad) towards the input; negative: they
    explode as exp(l/|xi_grad|); ``inf`` at chi_1 = 1.
    """
    c1 = chi_1(activation, sigma_w2, sigma_b2)
    if c1 == 1.0:
        return math.inf
    return -1.0 / math.log(c1)


def _depth(slope: float) -> float:
    if slope == 1.0:
        return math.inf
    if slope == 0.0:
        return 0.0
    return -1.0 / math.log(slope)
