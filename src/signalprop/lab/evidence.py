"""Effects with 95% intervals over seeds, the verdicts they allow, and theory-vs-measurement checks.

One place for the lab's statistics, so that every study decides the same way:

- :func:`mean_effect` (one sample, t interval), :func:`diff_effect` (difference of two means,
  Welch t interval), :func:`log_ratio_effect` (ratio of geometric means, Welch on the logs),
  :func:`rate_diff_effect` (difference of two success rates, Newcombe's hybrid Wilson interval) and
  :func:`bootstrap_effect` (any statistic of several groups, percentile bootstrap over seeds);
- :func:`verdict` turns an :class:`Effect` and the direction the claim predicts into ``supports``
  (the whole interval is on the claimed side of "no effect"), ``contradicts`` (the whole interval
  is on the other side) or ``inconclusive`` (the interval contains "no effect"; the effect then
  says how many seeds would resolve it, :func:`seeds_to_resolve`);
- :func:`within_effect` for claims of agreement ("reproduces the paper within 5 points"): supports
  when the interval lies inside the tolerance band, contradicts when it lies outside it;
- :func:`theory_check`: a prediction, the measurement, their relative error and whether it is
  within the stated tolerance (studies print it and flag a mismatch).

"No effect" is ``null`` (0 for differences, 1 for ratios). The statistics follow the usual
textbook forms (Welch 1947; Newcombe 1998, method 10; Efron & Tibshirani 1993 for the bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from signalprop.lab.base import CONTRADICTS, INCONCLUSIVE, SUPPORTS, fmt

#: Confidence level of every interval the lab reports.
LEVEL = 0.95
#: Most seeds :func:`seeds_to_resolve` will suggest (beyond it: "more than this").
MAX_SEEDS = 1000


@dataclass
class Effect:
    """An effect size with its 95% interval.

    Attributes:
        name: What is measured (e.g. ``"accuracy BN - plain"``).
        estimate: The point estimate.
        lo, hi: The 95% interval.
        n: Seeds (per group for two-group effects).
        method: ``"t"``, ``"welch"``, ``"log-welch"``, ``"newcombe"``, ``"bootstrap"`` or
            ``"exact"`` (no spread: all seeds agree).
        null: The value meaning "no effect".
        seeds_needed: Seeds per group that would make the interval exclude ``null`` if the
            estimate and spread stayed as measured (``None`` when the interval already excludes
            it, or when no number of seeds would: estimate equal to the null).
    """

    name: str
    estimate: float
    lo: float
    hi: float
    n: int
    method: str
    null: float = 0.0
    seeds_needed: int | None = None

    @property
    def excludes_null(self) -> bool:
        """Whether the whole interval is on one side of "no effect"."""
        return bool(self.lo > self.null or self.hi < self.null)

    def text(self, unit: Callable[[float], str] = fmt) -> str:
        """``"0.12 [95% CI 0.05, 0.19], n=5"``."""
        return f"{unit(self.estimate)} [95% CI {unit(self.lo)}, {unit(self.hi)}], n={self.n}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clean(values: Sequence[float]) -> np.ndarray:
    a = np.asarray([float(v) for v in values], dtype=float)
    return a[np.isfinite(a)]


def _tq(df: float) -> float:
    from scipy import stats as st

    return float(st.t.ppf(0.5 + LEVEL / 2, df)) if df > 0 else math.inf


def mean_effect(values: Sequence[float], name: str = "mean", null: float = 0.0) -> Effect:
    """Mean over seeds with a t interval (non-finite values are dropped)."""
    a = _clean(values)
    n = int(a.size)
    if n == 0:
        return Effect(name, math.nan, math.nan, math.nan, 0, "t", null)
    m = float(a.mean())
    if n == 1:
        e = Effect(name, m, -math.inf, math.inf, 1, "t", null)
    else:
        sd = float(a.std(ddof=1))
        h = _tq(n - 1) * sd / math.sqrt(n)
        e = Effect(name, m, m - h, m + h, n, "t" if sd > 0 else "exact", null)
    e.seeds_needed = seeds_to_resolve(e, a.std(ddof=1) if n > 1 else math.nan, groups=1)
    return e


def diff_effect(a: Sequence[float], b: Sequence[float], name: str = "difference") -> Effect:
    """mean(a) - mean(b) with a Welch t interval (seeds in the two groups need not pair)."""
    x, y = _clean(a), _clean(b)
    nx, ny = int(x.size), int(y.size)
    if nx == 0 or ny == 0:
        return Effect(name, math.nan, math.nan, math.nan, min(nx, ny), "welch")
    d = float(x.mean() - y.mean())
    vx = float(x.var(ddof=1)) if nx > 1 else math.nan
    vy = float(y.var(ddof=1)) if ny > 1 else math.nan
    if nx < 2 or ny < 2:
        e = Effect(name, d, -math.inf, math.inf, min(nx, ny), "welch")
        e.seeds_needed = seeds_to_resolve(e, math.nan, groups=2)
        return e
    se2 = vx / nx + vy / ny
    if se2 == 0:
        return Effect(name, d, d, d, min(nx, ny), "exact")
    df = se2**2 / ((vx / nx) ** 2 / (nx - 1) + (vy / ny) ** 2 / (ny - 1))
    h = _tq(df) * math.sqrt(se2)
    e = Effect(name, d, d - h, d + h, min(nx, ny), "welch")
    e.seeds_needed = seeds_to_resolve(e, math.sqrt((vx + vy) / 2), groups=2)
    return e


def log_ratio_effect(a: Sequence[float], b: Sequence[float], name: str = "ratio") -> Effect:
    """geomean(a) / geomean(b) with a Welch interval on the logs (positive quantities that span
    orders of magnitude: gradient norms, steps, landscape measures). Null: 1."""
    x = [math.log(v) for v in _clean(a) if v > 0]
    y = [math.log(v) for v in _clean(b) if v > 0]
    d = diff_effect(x, y, name)
    e = Effect(name, math.exp(d.estimate) if math.isfinite(d.estimate) else d.estimate,
               math.exp(d.lo) if d.lo == d.lo else math.nan,
               math.exp(d.hi) if d.hi == d.hi else math.nan, d.n,
               "log-welch" if d.method == "welch" else d.method, 1.0, d.seeds_needed)
    return e


def _wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    z = 1.959963984540054
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, c - h), min(1.0, c + h)


def _newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = _wilson(k1, n1)
    l2, u2 = _wilson(k2, n2)
    d = p1 - p2
    return (d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def rate_diff_effect(k1: int, n1: int, k2: int, n2: int, name: str = "rate difference") -> Effect:
    """k1/n1 - k2/n2 (success or divergence rates over seeds) with Newcombe's hybrid score
    interval, which stays sensible at 0/n and n/n where the Wald interval collapses."""
    if n1 == 0 or n2 == 0:
        return Effect(name, math.nan, math.nan, math.nan, min(n1, n2), "newcombe")
    d, lo, hi = _newcombe(k1, n1, k2, n2)
    e = Effect(name, d, lo, hi, min(n1, n2), "newcombe")
    if not e.excludes_null and d != 0:
        p1, p2 = k1 / n1, k2 / n2
        for n in range(min(n1, n2) + 1, MAX_SEEDS + 1):
            _, lo_n, hi_n = _newcombe(round(p1 * n), n, round(p2 * n), n)
            if lo_n > 0 or hi_n < 0:
                e.seeds_needed = n
                break
    return e


def rate_effect(k: int, n: int, name: str = "rate", null: float = 0.5) -> Effect:
    """A success rate k/n with its Wilson interval."""
    lo, hi = _wilson(k, n)
    return Effect(name, k / n if n else math.nan, lo, hi, n, "wilson", null)


def bootstrap_effect(
    groups: Sequence[Sequence[float]],
    statistic: Callable[..., float],
    name: str = "statistic",
    null: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
) -> Effect:
    """A statistic of several groups of per-seed values with a percentile bootstrap interval
    (each group resampled over its seeds, independently)."""
    arrs = [_clean(g) for g in groups]
    est = float(statistic(*arrs)) if all(a.size for a in arrs) else math.nan
    n = min((int(a.size) for a in arrs), default=0)
    if n < 2 or not math.isfinite(est):
        return Effect(name, est, -math.inf, math.inf, n, "bootstrap", null)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        boots[i] = statistic(*[a[rng.integers(0, a.size, a.size)] for a in arrs])
    boots = boots[np.isfinite(boots)]
    lo, hi = np.quantile(boots, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Effect(name, est, float(lo), float(hi), n, "bootstrap", null)


def seeds_to_resolve(e: Effect, sd: float, groups: int = 2) -> int | None:
    """Seeds (per group) at which a t interval with the measured spread ``sd`` would exclude the
    null if the estimate stayed where it is; ``None`` when it already does or never would."""
    if e.excludes_null:
        return None
    d = abs(e.estimate - e.null)
    if not math.isfinite(d) or d == 0:
        return None
    if not math.isfinite(sd) or sd <= 0:
        return max(3, e.n + 1)  # one seed, or no spread: the next seeds measure the spread
    for n in range(max(2, e.n + 1), MAX_SEEDS + 1):
        df = (groups * (n - 1)) if groups > 1 else n - 1
        if _tq(df) * sd * math.sqrt(groups / n) < d:
            return n
    return MAX_SEEDS


def verdict(e: Effect, direction: int = 1) -> str:
    """The verdict an effect allows when the claim predicts ``direction`` (+1: above the null,
    -1: below it): supports/contradicts only when the interval excludes the null."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be 1 or -1, got {direction!r}")
    if not (math.isfinite(e.estimate) and e.lo == e.lo and e.hi == e.hi) or not e.excludes_null:
        return INCONCLUSIVE
    above = e.lo > e.null
    return SUPPORTS if above == (direction > 0) else CONTRADICTS


def within_effect(e: Effect, lo: float, hi: float) -> str:
    """Verdict for a claim of agreement: the interval inside [lo, hi] supports, wholly outside
    contradicts, overlapping the edge is inconclusive."""
    if not (math.isfinite(e.lo) and math.isfinite(e.hi)):
        return INCONCLUSIVE
    if lo <= e.lo and e.hi <= hi:
        return SUPPORTS
    if e.hi < lo or e.lo > hi:
        return CONTRADICTS
    return INCONCLUSIVE


def describe(e: Effect, v: str, unit: Callable[[float], str] = fmt) -> str:
    """One clause: the effect, its interval and, when inconclusive, the seeds that would resolve
    it."""
    s = f"{e.name} {e.text(unit)}"
    if v == INCONCLUSIVE:
        if e.seeds_needed:
            s += f"; the interval includes no effect: about {e.seeds_needed} seeds per arm would " \
                 "resolve it"
        elif math.isfinite(e.estimate) and e.estimate == e.null:
            s += "; no effect measured"
        else:
            s += "; the interval includes no effect"
    return s


def numbers(e: Effect) -> dict[str, Any]:
    """The effect as entries of a conclusion's ``numbers`` (estimate, interval, seeds)."""
    return {e.name: e.estimate, f"{e.name} 95% CI": [e.lo, e.hi], f"{e.name} n": e.n,
            **({f"{e.name} seeds to resolve": e.seeds_needed} if e.seeds_needed else {})}


@dataclass
class TheoryCheck:
    """A prediction of :mod:`signalprop.theory` held against a measurement."""

    name: str
    predicted: float
    measured: float
    tolerance: float  # relative
    note: str = ""

    @property
    def rel_error(self) -> float:
        if self.predicted == 0:
            return abs(self.measured)
        return abs(self.measured - self.predicted) / abs(self.predicted)

    @property
    def ok(self) -> bool:
        return bool(math.isfinite(self.rel_error) and self.rel_error <= self.tolerance)

    def text(self) -> str:
        s = (f"{self.name}: theory {fmt(self.predicted)}, measured {fmt(self.measured)} "
             f"(relative error {fmt(100 * self.rel_error)}%, tolerance {fmt(100 * self.tolerance)}%)")
        if not self.ok:
            s += " MISMATCH" + (f" ({self.note})" if self.note else "")
        return s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rel_error": self.rel_error, "ok": self.ok}


def theory_check(name: str, predicted: float, measured: float, tolerance: float,
                 note: str = "") -> TheoryCheck:
    """Hold a theory prediction against a measurement with a stated relative tolerance; the
    check's :meth:`TheoryCheck.text` says MISMATCH (with ``note``, e.g. the known cause) beyond
    it."""
    return TheoryCheck(name, float(predicted), float(measured), float(tolerance), note)
