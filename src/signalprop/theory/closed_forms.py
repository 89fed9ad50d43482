"""Closed forms of the mean-field quantities, kept beside the numerics so each tests the other.

x ~ N(0, q); (u1, u2) jointly Gaussian with variances q and correlation c.

| activation | E[phi(x)^2]                | E[phi'(x)^2]          | source                    |
|------------|----------------------------|-----------------------|---------------------------|
| linear     | q                          | 1                     |                           |
| relu       | q / 2                      | 1 / 2                 | Cho & Saul 2009           |
| leaky_relu | q (1 + a^2) / 2            | (1 + a^2) / 2         |                           |
| erf        | (2/pi) asin(2q / (1 + 2q)) | (4/pi) (1 + 4q)^-1/2  | Williams 1997             |
| gaussian   | (1 + 2q)^-1/2              | q (1 + 2q)^-3/2       | Gaussian integrals        |
| sin        | (1 - e^-2q) / 2            | (1 + e^-2q) / 2       |                           |
| hardtanh   | q (erf a - 2a e^-a^2/sqrt(pi)) + 1 - erf a, a = 1/sqrt(2q) | erf a |      |

Critical points derived from them (chi_1 = 1 on the fixed-point curve
sigma_w^2(q) = (q - sigma_b^2)/E[phi^2](q), see :func:`signalprop.theory.critical_point`):

- relu, sigma_b = 0: sigma_w^2 = 2 (He et al. 2015); leaky_relu: 2 / (1 + a^2); linear: 1.
  With sigma_b > 0 none: chi_1 = 1 - sigma_b^2 / q* < 1 for every finite q*.
- phi(0) = 0 at sigma_b = 0 (tanh, erf, sin, hardtanh, softsign, elu, selu): the limit q* -> 0 at
  sigma_w^2 = 1 / E[phi'(0)^2] (tanh: 1, erf: pi/4).
- gaussian exp(-x^2/2): chi_1 = (q - sigma_b^2) q / (1 + 2q) = 1 gives
  q* = (2 + sigma_b^2 + sqrt((2 + sigma_b^2)^2 + 4)) / 2 and sigma_w^2 = (q* - sigma_b^2)
  sqrt(1 + 2q*); at sigma_b = 0: q* = sigma_w = 1 + sqrt(2).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special

from signalprop.theory.activations import SELU_ALPHA, SELU_LAMBDA


def arccos_kernel(c: float | np.ndarray) -> np.ndarray:
    """J(c) = (sqrt(1 - c^2) + (pi - arccos c) c) / pi, so E[relu(u1) relu(u2)] = q J(c) / 2
    (Cho & Saul 2009; the kernel in Yang et al. 2019's ReLU results)."""
    c = np.clip(np.asarray(c, dtype=np.float64), -1.0, 1.0)
    return (np.sqrt(1.0 - c * c) + (math.pi - np.arccos(c)) * c) / math.pi


def relu_moments(q: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E[relu(x)^2], E[relu'(x)^2]) = (q/2, 1/2)."""
    q = np.asarray(q, dtype=np.float64)
    return q / 2.0, np.full_like(q, 0.5)


def relu_c_map(c: float | np.ndarray, sigma_w2: float, sigma_b2: float, q: float) -> np.ndarray:
    """ReLU correlation map (sigma_w^2 q J(c)/2 + sigma_b^2) / q."""
    return (sigma_w2 * q * arccos_kernel(c) / 2.0 + sigma_b2) / q


def relu_chi_c(c: float | np.ndarray, sigma_w2: float) -> np.ndarray:
    """sigma_w^2 E[relu'(u1) relu'(u2)] = sigma_w^2 (pi - arccos c) / (2 pi)."""
    c = np.clip(np.asarray(c, dtype=np.float64), -1.0, 1.0)
    return sigma_w2 * (math.pi - np.arccos(c)) / (2.0 * math.pi)


def leaky_relu_moments(q: float | np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    """(E phi^2, E phi'^2) = (q (1 + a^2)/2, (1 + a^2)/2) for max(x, a x)."""
    q = np.asarray(q, dtype=np.float64)
    k = (1.0 + a * a) / 2.0
    return k * q, np.full_like(q, k)


def linear_moments(q: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q, 1)."""
    q = np.asarray(q, dtype=np.float64)
    return q.copy(), np.ones_like(q)


def erf_moments(q: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E erf(x)^2, E erf'(x)^2) = ((2/pi) asin(2q/(1+2q)), (4/pi)/sqrt(1+4q)) (Williams 1997)."""
    q = np.asarray(q, dtype=np.float64)
    return (2.0 / math.pi) * np.arcsin(2.0 * q / (1.0 + 2.0 * q)), (4.0 / math.pi) / np.sqrt(
        1.0 + 4.0 * q
    )


def erf_c_map(c: float | np.ndarray, sigma_w2: float, sigma_b2: float, q: float) -> np.ndarray:
    """(sigma_w^2 (2/pi) asin(2 q c / (1 + 2q)) + sigma_b^2) / q (Williams 1997)."""
    c = np.asarray(c, dtype=np.float64)
    return (sigma_w2 * (2.0 / math.pi) * np.arcsin(2.0 * q * c / (1.0 + 2.0 * q)) + sigma_b2) / q


def erf_chi_c(c: float | np.ndarray, sigma_w2: float, q: float) -> np.ndarray:
    """sigma_w^2 E[erf'(u1) erf'(u2)] = sigma_w^2 (4/pi) / sqrt((1 + 2q)^2 - 4 q^2 c^2)."""
    c = np.asarray(c, dtype=np.float64)
    return sigma_w2 * (4.0 / math.pi) / np.sqrt((1.0 + 2.0 * q) ** 2 - 4.0 * q * q * c * c)


def gaussian_moments(q: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """phi = exp(-x^2/2): (E phi^2, E phi'^2) = ((1+2q)^-1/2, q (1+2q)^-3/2)."""
    q = np.asarray(q, dtype=np.float64)
    return (1.0 + 2.0 * q) ** -0.5, q * (1.0 + 2.0 * q) ** -1.5


def sin_moments(q: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E sin^2 x, E cos^2 x) = ((1 - e^-2q)/2, (1 + e^-2q)/2)."""
    q = np.asarray(q, dtype=np.float64)
    e = np.exp(-2.0 * q)
    return (1.0 - e) / 2.0, (1.0 + e) / 2.0


def hardtanh_moments(q: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """clip(x, -1, 1): E phi^2 = q (erf a - 2a e^-a^2 / sqrt(pi)) + 1 - erf a, E phi'^2 = erf a,
    with a = 1/sqrt(2q)."""
    q = np.asarray(q, dtype=np.float64)
    a = 1.0 / np.sqrt(2.0 * q)
    ea = special.erf(a)
    return q * (ea - 2.0 * a * np.exp(-a * a) / math.sqrt(math.pi)) + 1.0 - ea, ea


#: Closed-form (E phi^2, E phi'^2) by activation name.
MOMENTS = {
    "linear": linear_moments,
    "relu": relu_moments,
    "erf": erf_moments,
    "gaussian": gaussian_moments,
    "sin": sin_moments,
    "hardtanh": hardtanh_moments,
}

#: lim_{q->0} E[phi'(x)^2] = (phi'(0+)^2 + phi'(0-)^2)/2 for activations with phi(0) = 0.
ZERO_SLOPE_SQUARED = {
    "tanh": 1.0,
    "erf": 4.0 / math.pi,
    "sin": 1.0,
    "hardtanh": 1.0,
    "softsign": 1.0,
    "elu": 1.0,  # alpha = 1: phi'(0-) = alpha = 1
    "selu": SELU_LAMBDA**2 * (1.0 + SELU_ALPHA**2) / 2.0,
}


def critical_sigma_w2_at_zero_bias(name: str, negative_slope: float = 0.01) -> float:
    """Closed-form critical sigma_w^2 at sigma_b = 0 (see the module docstring).

    Raises:
        ValueError: no closed form is listed for ``name``.
    """
    if name == "relu":
        return 2.0
    if name == "leaky_relu":
        return 2.0 / (1.0 + negative_slope**2)
    if name == "linear":
        return 1.0
    if name == "gaussian":
        return (1.0 + math.sqrt(2.0)) ** 2
    if name in ZERO_SLOPE_SQUARED:
        return 1.0 / ZERO_SLOPE_SQUARED[name]
    raise ValueError(f"no closed-form critical point listed for {name!r}")


def gaussian_critical_point(sigma_b2: float) -> tuple[float, float]:
    """(sigma_w^2, q*) on the edge of chaos for phi = exp(-x^2/2), exactly (module docstring)."""
    b = 2.0 + sigma_b2
    q = (b + math.sqrt(b * b + 4.0)) / 2.0
    return (q - sigma_b2) * math.sqrt(1.0 + 2.0 * q), q


def critical_point_from_moments(name: str, sigma_b2: float) -> tuple[float, float]:
    """(sigma_w^2, q*) solving chi_1 = 1 with the closed-form moments of ``name`` (erf, sin,
    hardtanh, gaussian) by a 1-D root in q: a check independent of the quadrature."""
    mom = MOMENTS[name]

    def chi(q: float) -> float:
        e2, d2 = mom(q)
        return float((q - sigma_b2) / e2 * d2) - 1.0

    qs = sigma_b2 + np.logspace(-7, 4, 400)
    vals = np.array([chi(float(q)) for q in qs])
    i = int(np.flatnonzero(np.sign(vals[:-1]) * np.sign(vals[1:]) < 0)[0])
    q = float(optimize.brentq(chi, qs[i], qs[i + 1], rtol=1e-14, xtol=1e-300))
    e2, _ = mom(q)
    return float((q - sigma_b2) / e2), q


def bn_gradient_rate_linear(batch_size: int) -> float:
    """Per-layer growth of the squared gradient norm in a deep batch-normalised linear network:
    (B - 2)/(B - 3) (Yang et al. 2019)."""
    b = _check_batch(batch_size)
    return (b - 2.0) / (b - 3.0)


def bn_gradient_rate_relu(batch_size: int) -> float:
    """Per-layer growth of the squared gradient norm in a deep BN-ReLU network, batch size B.

        lambda_G = (B - 3/2 + asin(rho)/pi + J(rho)) / ((B - 3) (1 - J(rho))),  rho = -1/(B-1),

    with J the arc-cosine kernel. It decreases to pi/(pi - 1) ~ 1.467 as B -> infinity.

    Derivation (the mean-field argument of Yang et al. 2019 for the BSB1 fixed point, worked out
    for ReLU; see :mod:`signalprop.theory.batchnorm`): with u uniform on the unit sphere of the
    centred batch subspace 1^perp, z = sqrt(B) u the BN output, D = diag(1[z > 0]), G = I - 11^T/B
    and P = G - u u^T,
    lambda_G = B E[tr(P D G D P)] / ((B - 3) E||G relu(z)||^2). The two-coordinate marginals of u
    reduce both expectations to the bivariate normal with correlation rho: P(z1 > 0, z2 > 0) =
    1/4 + asin(rho)/(2 pi) and E[z1 z2 1(z1, z2 > 0)] = J(rho)/2 (up to the chi^2 radius, which is
    independent of the direction). The same derivation gives (B-2)/(B-3) for the linear network.
    Checked against the sphere quadrature for general phi and against simulations of wide
    networks (tests/theory/test_theory_batchnorm.py).
    """
    b = _check_batch(batch_size)
    rho = -1.0 / (b - 1.0)
    j = float(arccos_kernel(rho))
    return (b - 1.5 + math.asin(rho) / math.pi + j) / ((b - 3.0) * (1.0 - j))


def _check_batch(batch_size: int) -> float:
    if int(batch_size) != batch_size or batch_size < 4:
        raise ValueError(
            f"batch_size must be an integer >= 4 (the BN gradient rate has a pole at B = 3), got "
            f"{batch_size}"
        )
    return float(batch_size)
