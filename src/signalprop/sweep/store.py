"""The results store: one SQLite database per sweep directory (``DIR/sweep.db``, WAL mode).

One row per run. Every change is one transaction, so a process killed at any moment (even
``kill -9``) leaves each run either finished (with all its results) or not; a run left
``running`` is simply run again by the next sweep on the same directory.
"""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signalprop.record import Record

DB_NAME = "sweep.db"
STATUSES = ("pending", "running", "done", "diverged", "failed")
FINISHED = ("done", "diverged")
SCHEMA_VERSION = 1



@dataclass
class RunOutcome:
    """What training one run of a sweep gave: the one shape every executor hands the store.

    Attributes:
        run_id: The run.
        status: ``done``, ``diverged`` or ``failed``.
        metrics: The engine's final metrics (:data:`signalprop.sweep.result.METRICS` and the
            population's size and wall time); empty when the run failed.
        record: The run's record as gzip'd JSON (:func:`encode_record`), or ``None``.
        wall_time: Seconds of training attributed to the run (its population's share).
        env: Where it ran (device, versions).
        error: The error text of a failed run.
    """

    run_id: str
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    record: bytes | None = None
    wall_time: float | None = None
    env: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in ("done", "diverged", "failed"):
            raise ValueError(
                f"run outcome status must be done, diverged or failed, got {self.status!r}"
            )

    @classmethod
    def failed(cls, run_id: str, error: str, env: dict[str, Any] | None = None) -> RunOutcome:
        """A run that produced nothing but an error."""
        return cls(run_id, "failed", env=dict(env or {}), error=error)


_DDL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id    TEXT PRIMARY KEY,
    idx       INTEGER NOT NULL,
    grp       TEXT NOT NULL,
    config    TEXT NOT NULL,
    labels    TEXT NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('pending','running','done','diverged','failed')),
    metrics   TEXT,
    record    BLOB,
    created   REAL NOT NULL,
    started   REAL,
    finished  REAL,
    wall_time REAL,
    env       TEXT,
    error     TEXT,
    attempts  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _enc_json(obj: Any) -> str:
    # NaN/Inf are not JSON; keep them explicit (json's own NaN extension, read back by loads)
    return json.dumps(obj, sort_keys=True, allow_nan=True)


class Store:
    """The sweep database.

    Args:
        path: The sweep directory (created) or the ``.db`` file itself.
        readonly: Open without creating anything.
    """

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False) -> None:
        p = Path(path)
        if p.suffix != ".db":
            if readonly and not p.exists():
                raise FileNotFoundError(f"no sweep directory at {p}")
            if not readonly:
                p.mkdir(parents=True, exist_ok=True)
            p = p / DB_NAME
        if readonly and not p.exists():
            raise FileNotFoundError(f"no sweep database at {p}")
        self.path = p
        # autocommit mode; transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
        self.conn = sqlite3.connect(str(p), timeout=60.0, isolation_level=None)
        self.conn.execute("PRAGMA busy_timeout=60000")
        if not readonly:
            self.conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL survives a killed process (not a power cut): enough for resuming
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(_DDL)  # idempotent (IF NOT EXISTS)
            self.set_meta("schema_version", str(SCHEMA_VERSION))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ---- meta ----------------------------------------------------------------------------
    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    # ---- runs ----------------------------------------------------------------------------
    def add_runs(self, runs: Iterable[tuple[str, int, str, dict, dict]]) -> int:
        """Insert ``(run_id, idx, group, config, labels)`` as pending unless present.
        Returns the number of new rows."""
        now = time.time()
        with self.transaction() as c:
            before = c.total_changes
            c.executemany(
                "INSERT OR IGNORE INTO runs(run_id, idx, grp, config, labels, status, created) "
                "VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                [(r, i, g, _enc_json(cfg), _enc_json(lab), now) for r, i, g, cfg, lab in runs],
            )
            return c.total_changes - before

    def reset_unfinished(self) -> int:
        """Runs left ``running`` (by a killed process) or ``failed`` go back to ``pending``."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE runs SET status = 'pending', started = NULL "
                "WHERE status IN ('running', 'failed')"
            )
            return cur.rowcount

    def statuses(self, run_ids: Iterable[str] | None = None) -> dict[str, str]:
        rows = self.conn.execute("SELECT run_id, status FROM runs").fetchall()
        d = dict(rows)
        if run_ids is not None:
            return {r: d[r] for r in run_ids if r in d}
        return d

    def _update_runs(self, assignments: str, rows: list[tuple[Any, ...]]) -> None:
        """``UPDATE runs SET <assignments> WHERE run_id = ?`` for each row (its last value is
        the run id), in one transaction."""
        with self.transaction() as c:
            c.executemany(f"UPDATE runs SET {assignments} WHERE run_id = ?", rows)

    def mark_running(self, run_ids: list[str]) -> None:
        now = time.time()
        self._update_runs("status = 'running', started = ?, attempts = attempts + 1",
                          [(now, r) for r in run_ids])

    def finish(self, results: list[RunOutcome]) -> None:
        """Write the results of one population (:class:`RunOutcome` each) in one transaction."""
        now = time.time()
        self._update_runs(
            "status = ?, metrics = ?, record = ?, finished = ?, wall_time = ?, env = ?, error = ?",
            [(r.status, _enc_json(r.metrics), r.record, now, r.wall_time, _enc_json(r.env),
              r.error, r.run_id) for r in results],
        )

    def rows(self, run_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """All runs (or the given ones, in that order) without their records."""
        cols = "run_id, idx, grp, config, labels, status, metrics, started, finished, " \
            "wall_time, env, error, attempts"
        cur = self.conn.execute(f"SELECT {cols} FROM runs ORDER BY idx, run_id")
        names = [c.strip() for c in cols.split(",")]
        out = []
        for row in cur.fetchall():
            d = dict(zip(names, row, strict=True))
            for k in ("config", "labels", "metrics", "env"):
                d[k] = json.loads(d[k]) if d[k] else {}
            out.append(d)
        if run_ids is not None:
            by = {d["run_id"]: d for d in out}
            out = [by[r] for r in run_ids if r in by]
        return out

    def record(self, run_id: str) -> Record:
        row = self.conn.execute("SELECT record, status FROM runs WHERE run_id = ?", (run_id,))
        got = row.fetchone()
        if got is None:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        if got[0] is None:
            raise ValueError(f"run {run_id} has no record (status {got[1]})")
        return Record.from_bytes(got[0], f"{self.path} run {run_id}")


def encode_record(rec: Record) -> bytes:
    """A record as gzip-compressed JSON (what the store keeps)."""
    return gzip.compress(rec.to_json().encode("utf-8"), mtime=0)
