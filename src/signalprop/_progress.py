"""The one progress bar (rich, on stderr so that ``--json`` on stdout stays clean).

The doctor drives it through the training loop's ``progress(step, loss)`` callback; the sweep
advances a "groups" and a "steps" line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ProgressBar:
    """One line per task: description, bar, done/total, optionally the loss, elapsed, remaining.

    Args:
        tasks: Task description -> total, in display order (the first is what ``bar(step, loss)``
            updates).
        enabled: When false, every method does nothing (no rich import).
        loss: Show a ``loss`` column (set by :meth:`__call__`).
        transient: Remove the bars when done (the doctor's report follows them).
    """

    def __init__(
        self, tasks: Mapping[str, int], *, enabled: bool = True, loss: bool = False,
        transient: bool = False,
    ) -> None:
        self._p: Any = None
        self._ids: dict[str, Any] = {}
        if not enabled or not tasks:
            return
        from rich.console import Console  # lazy: rich costs import time, only bars need it
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns: list[Any] = [TextColumn("[bold]{task.description:>8}"), BarColumn(),
                              MofNCompleteColumn()]
        if loss:
            columns.append(TextColumn("loss {task.fields[loss]}"))
        columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._p = Progress(*columns, console=Console(stderr=True), transient=transient)
        self._ids = {name: self._p.add_task(name, total=total, loss="-")
                     for name, total in tasks.items()}
        self._first = next(iter(self._ids.values()))
        self._p.start()

    def advance(self, task: str, n: int = 1) -> None:
        """Add ``n`` to ``task``'s count."""
        if self._p is not None:
            self._p.advance(self._ids[task], n)

    def __call__(self, step: int, loss: float) -> None:
        """The training loop's ``progress(step, loss)`` callback: first task at ``step + 1``."""
        if self._p is not None:
            self._p.update(self._first, completed=step + 1, loss=f"{loss:.4g}")

    def close(self) -> None:
        """Stop drawing (idempotent)."""
        if self._p is not None:
            self._p.stop()
            self._p = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
