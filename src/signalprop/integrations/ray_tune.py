"""Ray Tune: a probe ``on_record`` listener that reports each recorded step's summary scalars
to Tune, so a scheduler (ASHA, median stopping ...) can stop trials whose gradients vanish or
explode before they waste their budget.

    from signalprop.integrations.ray_tune import tune_reporter

    def trainable(config):
        ...
        with signalprop.Probe(model, optimizer=opt, schedule=5, on_record=[tune_reporter()]):
            ...  # the training loop

    tune.Tuner(trainable, tune_config=tune.TuneConfig(
        scheduler=ASHAScheduler(metric="log10_grad_ratio", mode="max"))).fit()

Needs the ``[ray]`` extra. Each report is one Tune iteration carrying the
:func:`~signalprop.integrations.common.summary_metrics` keys (without prefix), ``step`` (the
probe's step) and ``log10_grad_ratio`` (log10 of the first/last weight-gradient ratio: about 0
when gradients reach the input, -10 when they vanish; a monotone score for a scheduler).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from signalprop._optional import require
from signalprop.integrations.common import StepValues, summary_metrics


def log10_ratio(summary: Mapping[str, float], key: str = "grad_ratio_first_last") -> float:
    """log10 of a positive ratio; -inf for 0 and NaN for a missing or non-finite one."""
    v = summary.get(key, math.nan)
    if not math.isfinite(v) or v < 0:
        return math.nan
    return math.log10(v) if v > 0 else -math.inf


def tune_reporter(
    report: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[int, StepValues], None]:
    """A listener ``f(step, values)`` calling ``ray.tune.report`` with the step's summary.

    Args:
        report: The report function (default ``ray.tune.report``; pass another to test).
    """
    if report is None:
        report = require("ray.tune", "ray", "the Ray Tune reporter").report

    def listener(step: int, values: StepValues) -> None:
        s = summary_metrics(values, prefix="")
        metrics: dict[str, Any] = {"step": int(step), **s, "log10_grad_ratio": log10_ratio(s)}
        report(metrics)

    return listener
