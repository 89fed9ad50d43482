"""The lab's interval/verdict helper against closed forms and scipy (the oracle)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from signalprop.lab.base import CONTRADICTS, INCONCLUSIVE, SUPPORTS
from signalprop.lab.evidence import (
    bootstrap_effect,
    describe,
    diff_effect,
    log_ratio_effect,
    mean_effect,
    rate_diff_effect,
    theory_check,
    verdict,
    within_effect,
)


def test_mean_and_welch_intervals_match_scipy() -> None:
    a = [0.91, 0.93, 0.95, 0.92, 0.94]
    b = [0.81, 0.86, 0.80, 0.84, 0.79]
    e = mean_effect(a)
    ci = st.ttest_1samp(a, 0).confidence_interval(0.95)
    assert (e.lo, e.hi) == pytest.approx((ci.low, ci.high), rel=1e-10)
    d = diff_effect(a, b)
    ci = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d.estimate == pytest.approx(np.mean(a) - np.mean(b))
    assert (d.lo, d.hi) == pytest.approx((ci.low, ci.high), rel=1e-10)
    r = log_ratio_effect([1.0, 2.0, 4.0], [10.0, 20.0, 40.0])
    assert r.estimate == pytest.approx(0.1) and r.null == 1.0 and r.hi < 1.0


def test_newcombe_interval_matches_the_paper() -> None:
    # Newcombe 1998, Table II example (56/70 vs 48/80), method 10: 0.0524 to 0.3339
    e = rate_diff_effect(56, 70, 48, 80)
    assert e.estimate == pytest.approx(0.2)
    assert e.lo == pytest.approx(0.0524, abs=6e-4) and e.hi == pytest.approx(0.3339, abs=6e-4)
    # 3/3 vs 0/3 excludes no effect; 2/3 vs 1/3 does not, and says how many seeds would
    assert rate_diff_effect(3, 3, 0, 3).excludes_null
    half = rate_diff_effect(2, 3, 1, 3)
    assert not half.excludes_null and half.seeds_needed and half.seeds_needed > 3


def test_verdicts_follow_the_interval() -> None:
    up = diff_effect([1.0, 1.1, 0.9], [0.0, 0.1, -0.1])
    assert verdict(up, +1) == SUPPORTS and verdict(up, -1) == CONTRADICTS
    noisy = diff_effect([1.0, -1.0, 0.5], [0.0, 0.2, -0.1])
    assert verdict(noisy, +1) == INCONCLUSIVE
    assert noisy.seeds_needed is not None and noisy.seeds_needed > 3
    assert "seeds per arm would resolve" in describe(noisy, INCONCLUSIVE)
    one = mean_effect([0.5])  # one seed: never decisive
    assert verdict(one, +1) == INCONCLUSIVE
    with pytest.raises(ValueError, match="direction"):
        verdict(up, 0)
    m = mean_effect([0.66, 0.67, 0.665])
    assert within_effect(m, 0.63, 0.73) == SUPPORTS
    assert within_effect(mean_effect([0.40, 0.41, 0.42]), 0.63, 0.73) == CONTRADICTS


def test_bootstrap_covers_the_estimate_and_theory_check_flags() -> None:
    e = bootstrap_effect([[1.0, 2.0, 3.0, 4.0], [0.0, 0.5, 1.0, 0.2]],
                         lambda a, b: a.mean() - b.mean(), "diff")
    assert e.lo <= e.estimate <= e.hi and e.lo > 0
    ok = theory_check("rate", 1.49, 1.48, 0.05)
    bad = theory_check("variance", 64.0, 18.7, 0.25, note="heavy tails at width 200")
    assert ok.ok and "MISMATCH" not in ok.text()
    assert not bad.ok and "MISMATCH" in bad.text() and "heavy tails" in bad.text()
    assert math.isclose(bad.rel_error, (64 - 18.7) / 64)
