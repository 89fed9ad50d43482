"""The compact depth profile shared by the W&B and MLflow writers: per recorded step, one
metric over depth; a chart draws a line per step (a handful of steps, log-spaced) instead of one
plot per layer."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from signalprop.integrations.common import StepValues, depth_profile
from signalprop.report.figures import pick_steps


class ProfileHistory:
    """Depth profiles of one metric, kept per recorded step (a few floats per layer and step).

    Args:
        metric: The per-layer metric (``grad_norm``, ``out_grad_norm``, ``update_ratio`` ...).
        max_lines: Lines in a chart: that many steps, log-spaced, always the first and last.
    """

    def __init__(self, metric: str = "grad_norm", max_lines: int = 6) -> None:
        if max_lines < 1:
            raise ValueError(f"max_lines must be >= 1, got {max_lines!r}")
        self.metric = metric
        self.max_lines = max_lines
        self.layers: list[str] = []
        self.steps: dict[int, list[float]] = {}

    def add(self, step: int, values: StepValues) -> bool:
        """Keep this step's profile; ``False`` when the step has no value of the metric."""
        layers, vals = depth_profile(values, self.metric)
        if not layers:
            return False
        if layers != self.layers:  # a new model or a changed layer set: start over
            self.layers, self.steps = layers, {}
        self.steps[int(step)] = vals
        return True

    def chosen(self) -> list[int]:
        """The steps a chart shows."""
        return pick_steps(list(self.steps), self.max_lines)

    def log10_lines(self) -> tuple[list[int], list[list[float | None]]]:
        """``(steps, log10 values per step)``; ``None`` where a value is 0, negative or not
        finite (a log axis cannot show it; the record keeps the value)."""
        steps = self.chosen()
        return steps, [[_log10(v) for v in self.steps[s]] for s in steps]


class ProfileWriter:
    """What the W&B and MLflow writers share: a prefix and the depth profiles of some metrics,
    re-drawn every ``profile_every`` recorded steps.

    Raises:
        ValueError: ``profile_every`` below 1.
    """

    def __init__(self, prefix: str, profile_metrics: Iterable[str], max_lines: int,
                 profile_every: int) -> None:
        if profile_every < 1:
            raise ValueError(f"profile_every must be >= 1, got {profile_every!r}")
        self.prefix = prefix
        self.profiles = [ProfileHistory(m, max_lines) for m in profile_metrics]
        self.profile_every = profile_every
        self._n = 0
        self._dirty = False

    def _add_profiles(self, step: int, values: StepValues) -> bool:
        """Keep this step's profiles; whether the charts are due for a re-draw."""
        for prof in self.profiles:
            self._dirty |= prof.add(step, values)
        self._n += 1
        return self._dirty and self._n % self.profile_every == 0


def _log10(v: float) -> float | None:
    return math.log10(v) if math.isfinite(v) and v > 0 else None


def short_labels(layers: Sequence[str]) -> list[str]:
    """Tick labels: the last two components of each qualified name."""
    return [".".join(n.split(".")[-2:]) for n in layers]
