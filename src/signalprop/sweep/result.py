"""The result of a sweep, read from its database: a table, CSV, and per-run records."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from signalprop.record import Record, atomic_write_text
from signalprop.sweep.config import SCHEMA
from signalprop.sweep.store import Store

#: Metric columns of :meth:`SweepResult.to_dataframe` (present even when a run has none yet).
METRICS = (
    "final_loss",
    "min_loss",
    "train_loss",
    "test_loss",
    "train_accuracy",
    "test_accuracy",
    "diverged_step",
    "diverged_reason",
    "grad_ratio_init",
    "grad_ratio_final",
)


class SweepResult:
    """Runs of a sweep directory.

    Args:
        path: The sweep directory (holding ``sweep.db``).
        run_ids: Restrict to these runs (in this order); ``None``: every run in the database.
    """

    def __init__(self, path: str | os.PathLike[str], run_ids: list[str] | None = None) -> None:
        self.path = Path(path)
        self.run_ids = list(run_ids) if run_ids is not None else None
        Store(self.path, readonly=True).close()  # fail early if there is no database

    def _store(self) -> Store:
        return Store(self.path, readonly=True)

    @property
    def runs(self) -> list[dict[str, Any]]:
        """One dict per run: run_id, idx, grp, config, labels, status, metrics, timings, env,
        error, attempts."""
        with self._store() as s:
            return s.rows(self.run_ids)

    def __len__(self) -> int:
        return len(self.runs)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.status_counts().items()))
        return f"SweepResult({str(self.path)!r}: {counts})"

    def status_counts(self) -> dict[str, int]:
        """``{status: number of runs}``."""
        return dict(Counter(r["status"] for r in self.runs))

    def to_dataframe(self) -> Any:
        """One row per run: ``run_id``, ``group``, the config keys, the axis labels, ``status``,
        the metrics (:data:`METRICS`), ``wall_time``, ``error``."""
        from signalprop._optional import require

        pd = require("pandas", "lab", "SweepResult.to_dataframe")

        rows = []
        label_cols: list[str] = []
        for r in self.runs:
            d: dict[str, Any] = {"run_id": r["run_id"], "group": r["grp"]}
            for k in SCHEMA:
                v = r["config"].get(k)
                d[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
            for k, v in r["labels"].items():
                if k not in label_cols:
                    label_cols.append(k)
                d[k] = v
            d["status"] = r["status"]
            for m in METRICS:
                d[m] = r["metrics"].get(m)
            d["wall_time"] = r["wall_time"]
            d["error"] = r["error"]
            rows.append(d)
        cols = ["run_id", "group", *SCHEMA, *label_cols, "status", *METRICS, "wall_time", "error"]
        df = pd.DataFrame(rows, columns=cols)
        for m in METRICS:
            if m not in ("diverged_step", "diverged_reason"):
                df[m] = pd.to_numeric(df[m], errors="coerce")
        df["diverged_step"] = df["diverged_step"].astype("Int64")
        return df

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dataframe` as CSV (atomically)."""
        atomic_write_text(path, self.to_dataframe().to_csv(index=False))
        return Path(path)

    def record(self, run_id: str) -> Record:
        """The per-layer curves of one run (a :class:`signalprop.Record`)."""
        with self._store() as s:
            return s.record(run_id)


def load(path: str | os.PathLike[str]) -> SweepResult:
    """Open a sweep directory written by :func:`signalprop.sweep`."""
    return SweepResult(path)
