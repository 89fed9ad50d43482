"""When to record: a schedule is a predicate ``step -> bool`` (cockpit's ``track_schedule``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

Schedule = Callable[[int], bool]


@dataclass(frozen=True)
class every:  # noqa: N801 - reads like a function at the call site: every(10)
    """Record every ``n`` steps starting at ``start`` (steps 0, n, 2n, ...)."""

    n: int = 1
    start: int = 0

    def __post_init__(self) -> None:
        if int(self.n) < 1:
            raise ValueError(f"every(n) needs n >= 1, got {self.n}")

    def __call__(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.n == 0

    def __str__(self) -> str:
        return f"every({self.n})"


@dataclass(frozen=True)
class at_steps:  # noqa: N801
    """Record exactly at the given steps."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        s = frozenset(int(v) for v in steps)
        if any(v < 0 for v in s):
            raise ValueError("at_steps: steps must be >= 0")
        object.__setattr__(self, "steps", s)

    def __call__(self, step: int) -> bool:
        return step in self.steps

    def __str__(self) -> str:
        return f"at_steps({sorted(self.steps)})"


def log_spaced(max_step: int, num: int = 20) -> at_steps:
    """About ``num`` steps spaced logarithmically in [0, max_step] (always includes 0 and the
    last step ``max_step - 1`` of a run of ``max_step`` steps)."""
    if max_step < 1 or num < 1:
        raise ValueError(f"log_spaced needs max_step >= 1 and num >= 1, got {max_step}, {num}")
    pts = np.unique(np.round(np.logspace(0, np.log10(max_step), num)).astype(int) - 1)
    return at_steps([0, max_step - 1, *pts.tolist()])


def as_schedule(schedule: Schedule | int | Iterable[int] | None) -> Schedule:
    """Coerce ``None`` (every step), an int ``n`` (every n) or a list of steps to a schedule."""
    if schedule is None:
        return every(1)
    if isinstance(schedule, bool):
        raise TypeError("schedule must be a callable, an int or a list of steps, not a bool")
    if isinstance(schedule, int):
        return every(schedule)
    if callable(schedule):
        return schedule
    if isinstance(schedule, Iterable):
        return at_steps(schedule)
    raise TypeError(
        f"schedule must be a callable step -> bool, an int or a list of steps, "
        f"got {type(schedule).__name__}"
    )
