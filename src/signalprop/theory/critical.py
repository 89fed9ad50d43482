"""The edge of chaos: critical points (chi_1 = 1 at a stable q*), critical lines over the bias
variance and phase diagrams (see :mod:`signalprop.theory.meanfield` for the model)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import optimize

from signalprop.theory.activations import Activation, get_activation
from signalprop.theory.maps import (
    Q_INF,
    Q_ZERO,
    ActivationSpec,
    length_moments,
)
from signalprop.theory.quadrature import gaussian_expectations

#: The q grid scanned for critical points: sigma_b^2 + t, t log-spaced over these decades, first
#: up to Q_SCAN_MID (cheap everywhere), extended to Q_SCAN_MAX only when no critical point was
#: found below (large q needs many nodes for oscillating activations such as sin).
Q_SCAN_MIN, Q_SCAN_MID, Q_SCAN_MAX = 1e-7, 1e3, 1e6

#: Below this bias variance, when the scan finds no crossing for an activation with phi(0) = 0,
#: the critical point is the sigma_b^2 -> 0 limit (see :func:`critical_point`).
SIGMA_B2_RESOLUTION = 1e-12
_SCAN_PER_DECADE = 8

__all__ = [
    "Q_SCAN_MIN", "Q_SCAN_MID", "Q_SCAN_MAX", "SIGMA_B2_RESOLUTION", "NoCriticalPoint",
    "CriticalPoint", "CriticalLine", "critical_point", "critical_line", "phase_diagram",
]


class NoCriticalPoint(ValueError):
    """No finite (sigma_w, q*) puts this activation on the edge of chaos at this sigma_b^2.

    Attributes:
        reason: Why, in words and numbers (also the exception message).
        activation: The activation's name.
        sigma_b2: The bias variance asked for.
    """

    def __init__(self, reason: str, activation: str = "", sigma_b2: float = float("nan")):
        super().__init__(reason)
        self.reason = reason
        self.activation = activation
        self.sigma_b2 = sigma_b2


@dataclass(frozen=True)
class CriticalPoint:
    """A point on the edge of chaos: chi_1 = 1 at a stable fixed point q* of the length map.

    Attributes:
        activation: Name of the activation.
        sigma_b2: Bias variance sigma_b^2.
        sigma_w2: Critical weight variance sigma_w^2 (weights ~ N(0, sigma_w^2 / fan_in)).
        sigma_w: sqrt(sigma_w2).
        q_star: Fixed point of the length map; ``0.0`` when the critical point is the limit
            q* -> 0 (odd-like activations at sigma_b = 0: tanh, erf, ...); ``nan`` when every q
            is a fixed point (positively homogeneous activations at sigma_b = 0: relu, linear).
        chi_1: sigma_w^2 E[phi'(sqrt(q*) z)^2] at the returned point (1 up to solver tolerance).
        q_slope: Slope of the length map at q* (|q_slope| < 1: stable; 1: marginal).
        kind: ``"fixed-point"``, ``"limit q*->0"`` or ``"marginal"``.
        note: Extra information (other critical fixed points, how the limit is reached).
    """

    activation: str
    sigma_b2: float
    sigma_w2: float
    sigma_w: float
    q_star: float
    chi_1: float
    q_slope: float
    kind: str = "fixed-point"
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN -> None)."""
        d = asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


@dataclass(frozen=True)
class CriticalLine:
    """The edge of chaos as a function of sigma_b^2 (see :func:`critical_line`).

    Arrays have one entry per requested sigma_b^2; where no critical point exists the entry is
    NaN and ``reasons[i]`` says why (``None`` where one exists).
    """

    activation: str
    sigma_b2: np.ndarray
    sigma_w2: np.ndarray
    sigma_w: np.ndarray
    q_star: np.ndarray
    reasons: list[str | None] = field(default_factory=list)


def _zero_slope_limit(act: Activation) -> float:
    """lim_{q->0} E[phi'(sqrt(q) z)^2] = (phi'(0+)^2 + phi'(0-)^2) / 2 (kinks at 0 allowed)."""
    eps = 1e-9
    d = act.dphi(np.array([eps, -eps]))
    return float(0.5 * (d[0] ** 2 + d[1] ** 2))


def _scan(act: Activation, sigma_b2: float, lo: float, hi: float) -> dict[str, np.ndarray]:
    n = max(2, int(round(math.log10(hi / lo) * _SCAN_PER_DECADE)) + 1)
    t = np.logspace(math.log10(lo), math.log10(hi), n)
    q = sigma_b2 + t
    m = length_moments(act, q)
    s = t / m[0]  # sigma_w^2 that makes q a fixed point: (q - sigma_b^2) / E phi^2
    return {"q": q, "S": s, "X": s * m[1], "D": s * m[2] / q}


def _fixed_point_quantities(act: Activation, q: float, sigma_b2: float) -> tuple[float, float, float]:
    """(sigma_w^2, chi_1, q-map slope) of the fixed point at q with bias variance sigma_b2."""
    m = length_moments(act, q)
    s = (q - sigma_b2) / float(m[0])
    return s, s * float(m[1]), s * float(m[2]) / q


def critical_point(activation: ActivationSpec, sigma_b2: float = 0.0) -> CriticalPoint:
    """The edge of chaos at bias variance sigma_b^2: sigma_w^2 with chi_1 = 1 at a stable q*.

    Method (the parametrisation of Schoenholz et al. 2017 / deepchaos): every q > sigma_b^2 is
    the fixed point of the length map for exactly one sigma_w^2(q) = (q - sigma_b^2)/E[phi^2](q);
    along this curve chi_1(q) = sigma_w^2(q) E[phi'^2](q). We scan q log-uniformly
    (sigma_b^2 + 1e-7 ... sigma_b^2 + 1e6), find where chi_1(q) crosses 1, refine with Brent's
    method, and keep crossings where the fixed point is stable (|d q-map/dq| < 1). Special cases:

    - positively homogeneous phi (relu, leaky_relu, linear) at sigma_b = 0: chi_1 does not depend
      on q and every q is a fixed point at the critical sigma_w^2 = 1/E[phi'^2]: returned with
      ``q_star = nan``, ``kind = "marginal"``;
    - phi(0) = 0 at sigma_b = 0 with chi_1 -> 1 as q -> 0 and no crossing (tanh, erf, sin, ...):
      the critical point is the limit q* -> 0 at sigma_w^2 = 1/phi'(0)^2, valid when q = 0 then
      attracts the variance (it decays, polynomially); ``q_star = 0.0``, ``kind = "limit q*->0"``.

    Args:
        activation: Activation spec.
        sigma_b2: Bias variance >= 0.

    Returns:
        A :class:`CriticalPoint`.

    Raises:
        NoCriticalPoint: no finite critical point exists; the message says why (e.g. softplus:
            chi_1 < 1 at every finite q* and tends to 1 only as q* -> infinity).

    Example:
        >>> round(critical_point("tanh", 0.05).sigma_w, 3)
        1.327
    """
    if not (math.isfinite(sigma_b2) and sigma_b2 >= 0):
        raise ValueError(f"sigma_b2 must be finite and >= 0, got {sigma_b2}")
    act = get_activation(activation)
    sigma_b2 = float(sigma_b2)
    name = act.name

    if act.homogeneous and sigma_b2 == 0.0:
        e1 = float(gaussian_expectations(lambda x: act.dphi(x) ** 2, 1.0, kinks=act.kinks)[0])
        sw2 = 1.0 / e1
        return CriticalPoint(
            name, 0.0, sw2, math.sqrt(sw2), math.nan, 1.0, 1.0, "marginal",
            "positively homogeneous activation: chi_1 = sigma_w^2 E[phi'^2] does not depend on "
            "q, and at this sigma_w every q is a fixed point (the variance neither grows nor "
            "decays)",
        )

    scans = [_scan(act, sigma_b2, Q_SCAN_MIN, Q_SCAN_MID)]
    result = _critical_from_scan(act, sigma_b2, scans[0])
    if isinstance(result, CriticalPoint):
        return result
    more = _scan(act, sigma_b2, Q_SCAN_MID, Q_SCAN_MAX)
    full = {k: np.concatenate([scans[0][k], more[k][1:]]) for k in more}
    result = _critical_from_scan(act, sigma_b2, full)
    if isinstance(result, CriticalPoint):
        return result
    raise NoCriticalPoint(result, name, sigma_b2)


def _crossings(act: Activation, sigma_b2: float, q: np.ndarray, y: np.ndarray
               ) -> tuple[list[tuple[float, float, float, float]],
                          list[tuple[float, float, float, float]]]:
    """The scan's crossings of chi_1 = 1 as (q*, sigma_w^2, chi_1, q-map slope), split into
    stable and unstable fixed points."""
    stable: list[tuple[float, float, float, float]] = []
    unstable: list[tuple[float, float, float, float]] = []

    def g(qq: float) -> float:
        return _fixed_point_quantities(act, qq, sigma_b2)[1] - 1.0

    # sign changes between *significant* values only: near q -> 0, chi_1 - 1 can be O(q^2) ~
    # 1e-14, where the rounding of phi' (finite differences: ~1e-10) would fake crossings
    sig = np.flatnonzero(np.abs(y) > 1e-8)
    pairs = [(i, j) for i, j in zip(sig[:-1], sig[1:], strict=True) if y[i] * y[j] < 0]
    for i, j in pairs:
        qc = float(optimize.brentq(g, q[i], q[j], rtol=1e-12, xtol=1e-300))
        sw2, c1, slope = _fixed_point_quantities(act, qc, sigma_b2)
        (stable if abs(slope) < 1.0 else unstable).append((qc, sw2, c1, slope))

    return stable, unstable


def _critical_from_scan(act: Activation, sigma_b2: float, sc: dict[str, np.ndarray]
                        ) -> CriticalPoint | str:
    """A critical point from a scan, or the reason why there is none on it."""
    name = act.name
    stable, unstable = _crossings(act, sigma_b2, sc["q"], sc["X"] - 1.0)
    if stable:
        qc, sw2, c1, slope = stable[0]
        note = ""
        if len(stable) > 1:
            others = ", ".join(f"(q*={p[0]:.4g}, sigma_w={math.sqrt(p[1]):.4g})" for p in stable[1:])
            note = f"further critical fixed points at larger q*: {others}"
        return CriticalPoint(name, sigma_b2, sw2, math.sqrt(sw2), qc, c1, slope, "fixed-point",
                             note)

    limit = _zero_variance_limit(act, sigma_b2, sc)
    if isinstance(limit, CriticalPoint):
        return limit
    return _no_critical_point(name, sigma_b2, sc, unstable, limit)


def _zero_variance_limit(act: Activation, sigma_b2: float, sc: dict[str, np.ndarray]
                         ) -> CriticalPoint | str:
    """The q* -> 0 limit as the critical point when it is one (phi(0) = 0, no bias), else
    what that limit does ("" when it does not apply)."""
    name, s, x = act.name, sc["S"], sc["X"]
    phi0 = float(act.phi(np.array([0.0]))[0])
    # a sigma_b^2 so small that chi_1 - 1 at its fixed point is below the scan's resolution
    # (tanh at 1e-20: q* ~ 1e-7, chi_1 - 1 ~ 1e-14) is the sigma_b^2 -> 0 limit to that accuracy:
    # answering "no critical point" there made the critical line jump from ~1 to nothing
    tiny = 0.0 < sigma_b2 <= SIGMA_B2_RESOLUTION
    if (sigma_b2 == 0.0 or tiny) and abs(phi0) < 1e-12:
        e0 = _zero_slope_limit(act)
        if e0 > 0:
            s0 = 1.0 / e0
            # q = 0 attracts at sigma_w^2 = s0 iff q-map(q) < q for small q, i.e. S(q) > s0
            head = slice(0, 8)
            attracting = bool(np.all(s[head] >= s0 * (1 - 1e-9)))
            if attracting and abs(x[0] - 1.0) < 1e-3:
                note = (
                    "phi(0) = 0: q* = 0 is a fixed point whose chi_1 = sigma_w^2 phi'(0)^2 "
                    "crosses 1 here; for larger sigma_w a q* > 0 appears with chi_1 > 1 "
                    "(chaos). At this sigma_w the variance decays to 0 only polynomially "
                    "with depth, so keep the input variance small")
                if tiny:
                    note = (f"sigma_b^2 = {sigma_b2:g} is below the resolution of the fixed-point "
                            f"scan ({SIGMA_B2_RESOLUTION:g}): the sigma_b^2 -> 0 limit is "
                            "returned (it differs from the exact value by about "
                            "(sigma_b^2)^(1/3)); " + note)
                return CriticalPoint(
                    name, sigma_b2, s0, math.sqrt(s0), 0.0, 1.0, 1.0, "limit q*->0", note,
                )
            if not attracting:
                return (
                    f"chi_1 -> 1 as q* -> 0 (sigma_w^2 = 1/phi'(0)^2 = {s0:.4g}), but there q = 0 "
                    "repels the variance (q-map(q) > q for small q > 0), so that limit is not "
                    "reached"
                )
            return ""
        return "phi'(0) = 0, so chi_1 -> 0 as q* -> 0"
    return ""


def _no_critical_point(name: str, sigma_b2: float, sc: dict[str, np.ndarray],
                       unstable: list[tuple[float, float, float, float]], lim0: str) -> str:
    """Why the scan holds no critical point, in words from its numbers."""
    q, s, x, d = sc["q"], sc["S"], sc["X"], sc["D"]
    y = x - 1.0
    parts: list[str] = []
    qmax, xmax_end = q[-1], x[-1]
    if unstable:
        desc = ", ".join(
            f"q*={p[0]:.4g} (sigma_w={math.sqrt(p[1]):.4g}, q-map slope {p[3]:.4g})"
            for p in unstable[:3]
        )
        parts.append(
            f"chi_1 = 1 only at unstable fixed points of the length map: {desc}; the variance "
            "drifts away from them with depth, to where chi_1 != 1"
        )
    elif np.all(y < 0):
        tail = x[-_SCAN_PER_DECADE:]
        if xmax_end > 0.95 and np.all(np.diff(tail) > 0):
            parts.append(
                f"chi_1 < 1 at every finite fixed point q* > sigma_b^2 and approaches 1 only as "
                f"q* -> infinity (chi_1 = {xmax_end:.4f} at q* = {qmax:.3g}, sigma_w^2 -> "
                f"{s[-1]:.4g}); the network is ordered (gradients vanish) for every finite q*"
            )
        else:
            parts.append(
                f"chi_1 < 1 at every fixed point (largest {x.max():.4g}, at q* = "
                f"{q[int(np.argmax(x))]:.4g}): the network is always in the ordered phase"
            )
    elif np.all(y > 0):
        where = (
            "tending to 1 only as q* -> 0" if abs(x[0] - 1.0) < 1e-3
            else f"smallest {x.min():.4g}"
        )
        if np.all(np.abs(d) > 1.0):
            parts.append(
                f"every fixed point q* > 0 has chi_1 > 1 ({where}) and is unstable (q-map slope "
                f"{np.abs(d).min():.4g} to {np.abs(d).max():.4g}): the variance runs away from "
                "it, towards 0 or without bound, so no depth-stationary variance sits on the "
                "edge of chaos"
            )
        else:
            parts.append(
                f"chi_1 > 1 at every fixed point q* > 0 ({where}): every sigma_w with a finite "
                "fixed point is chaotic"
            )
    if lim0:
        parts.append(lim0)
    if not parts:  # pragma: no cover - crossings are either stable or unstable
        parts.append("no crossing of chi_1 = 1 found")
    return f"{name} at sigma_b^2 = {sigma_b2:g}: no critical point: " + "; ".join(parts)


def critical_line(activation: ActivationSpec, sigma_b2s: Sequence[float] | np.ndarray
                  ) -> CriticalLine:
    """The critical sigma_w^2 for each sigma_b^2 (the order-to-chaos transition line).

    Entries without a critical point are NaN, with the reason in ``reasons``.
    """
    act = get_activation(activation)
    sb = np.asarray(sigma_b2s, dtype=np.float64).ravel()
    sw2 = np.full(sb.shape, np.nan)
    qs = np.full(sb.shape, np.nan)
    reasons: list[str | None] = []
    for i, b in enumerate(sb):
        try:
            cp = critical_point(act, float(b))
        except NoCriticalPoint as e:
            reasons.append(e.reason)
            continue
        sw2[i], qs[i] = cp.sigma_w2, cp.q_star
        reasons.append(None)
    return CriticalLine(act.name, sb, sw2, np.sqrt(sw2), qs, reasons)


def _iterate_length_map(act: Activation, w2: np.ndarray, b2: np.ndarray, q0: float,
                        max_iter: int, rtol: float) -> np.ndarray:
    """q* on a grid of (sigma_w^2, sigma_b^2): the length map iterated from q0 for every entry at
    once (plain steps, then guarded Newton steps), up to ``max_iter`` layers or ``rtol``."""
    q = np.full(w2.shape, float(q0))
    active = np.ones(w2.shape, dtype=bool)
    for it in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        qa = q.flat[idx]
        m = length_moments(act, qa)
        fa = w2.flat[idx] * m[0] + b2.flat[idx]  # one plain step of the length map
        qn = fa
        if it >= 3:
            # Newton on F(q) = q-map(q) - q once in the basin (q-map'(q) = sigma_w^2 E[x phi
            # phi'] / q), kept only when it moves the way the plain step does and stays > 0
            slope = w2.flat[idx] * m[2] / np.maximum(qa, 1e-300)
            with np.errstate(divide="ignore", invalid="ignore"):
                newton = qa - (fa - qa) / (slope - 1.0)
            ok = np.isfinite(newton) & (newton > 0) & ((newton - qa) * (fa - qa) > 0)
            qn = np.where(ok, newton, fa)
        else:
            slope = None
        qn = np.minimum(qn, Q_INF)
        if slope is not None:
            # past 1e6 and still growing with a length-map slope >= 1: it diverges (geometrically
            # or slower); record it as infinite instead of iterating to 1e12
            runaway = (qn > 1e6) & (fa > qa) & (slope >= 1.0)
            qn = np.where(runaway, Q_INF, qn)
        q.flat[idx] = qn
        done = (np.abs(qn - qa) <= rtol * np.maximum(qn, 1e-300)) | (qn >= Q_INF) | (qn < Q_ZERO)
        active.flat[idx[done]] = False
    return q


def phase_diagram(
    activation: ActivationSpec,
    sigma_w: np.ndarray,
    sigma_b2: np.ndarray,
    q0: float = 1.0,
    *,
    max_iter: int = 100,
    rtol: float = 1e-7,
) -> dict[str, np.ndarray]:
    """chi_1 and its depth scale on a (sigma_b^2, sigma_w) grid: the order-to-chaos phase diagram
    (Poole et al. 2016, Fig. 2; Schoenholz et al. 2017, Fig. 1).

    q* is found for the whole grid at once by iterating the length map from q0 (vectorised), up to
    ``max_iter`` layers or until every entry changed by less than ``rtol`` (relative); near the
    transition convergence is slow and the entry shows the variance after ``max_iter`` layers.

    Args:
        activation: Activation spec.
        sigma_w: Weight standard deviations, shape [W].
        sigma_b2: Bias variances, shape [Bb].
        q0: Initial variance.

    Returns:
        Dict with ``chi_1`` [Bb, W], ``q_star`` [Bb, W] (inf where it diverges), ``xi`` [Bb, W]
        = 1/|ln chi_1| (layers over which the squared gradient changes by a factor e; equal to
        xi_c in the ordered phase, where c* = 1) and the axes ``sigma_w``, ``sigma_b2``.
    """
    act = get_activation(activation)
    sw = np.asarray(sigma_w, dtype=np.float64).ravel()
    sb = np.asarray(sigma_b2, dtype=np.float64).ravel()
    if np.any(sw <= 0) or np.any(sb < 0):
        raise ValueError("sigma_w must be > 0 and sigma_b2 >= 0")
    w2 = np.broadcast_to((sw * sw)[None, :], (sb.size, sw.size))
    b2 = np.broadcast_to(sb[:, None], w2.shape)
    q = _iterate_length_map(act, w2, b2, q0, max_iter, rtol)
    q = np.where(q < Q_ZERO, 0.0, q)
    d2 = gaussian_expectations(lambda x: act.dphi(x) ** 2, np.minimum(q, Q_INF), kinks=act.kinks)
    chi = w2 * d2[0]
    with np.errstate(divide="ignore"):
        xi = 1.0 / np.abs(np.log(chi))
    return {"chi_1": chi, "q_star": np.where(q >= Q_INF, np.inf, q), "xi": xi, "sigma_w": sw,
            "sigma_b2": sb}
