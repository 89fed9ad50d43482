"""Sweep-based parts of the studies: a grid in the sweep runner's run-config schema
(``docs/sweep.md``) goes through :func:`signalprop.sweep.sweep`, which trains runs that share an
architecture as one batched population and stores them in ``workdir/sweep/<part>/sweep.db``
(resumable: a killed study re-runs only unfinished runs).

:func:`run_grid` returns plain dicts (one per run): the run config, the labelled axes, the
status and final metrics, and (when asked) the model-level curves from the run's record.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from signalprop.lab.base import from_jsonable, to_jsonable
from signalprop.sweep.result import METRICS as _SWEEP_METRICS

#: Metrics copied from the sweep's result table (its metric columns plus status and timing).
METRICS = ("status", *_SWEEP_METRICS, "wall_time")


def _clean(v: Any) -> Any:
    try:
        import numpy as np

        if isinstance(v, np.generic):
            v = v.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, float) and math.isnan(v):
        return math.nan
    return v


def run_grid(
    grid: dict[str, Any] | list[dict[str, Any]],
    workdir: str | Path,
    part: str,
    *,
    executor: str = "local",
    workers: int = 1,
    curves: tuple[str, ...] = (),
    layer_curves: tuple[tuple[str, str], ...] = (),
) -> list[dict[str, Any]]:
    """Run a grid through the sweep runner and return one dict per run.

    Args:
        grid: A sweep grid (``base``/``axes``/``seeds``) or a list of run configs.
        workdir: The study's directory; the sweep lives in ``workdir/sweep/<part>``.
        part: Name of this part of the study (a folder name).
        executor: ``"local"`` or ``"ray"``.
        workers: ``local``: number of worker processes (populations run in parallel).
        curves: Model-level metrics (e.g. ``"loss"``, ``"accuracy"``) to copy from each run's
            record as ``{"curves": {metric: {"steps": [...], "values": [...]}}}``.
        layer_curves: ``(metric, role)`` pairs: per-layer metric matrices copied as
            ``{"layer_curves": {metric: {"steps", "layers", "values"}}}``.

    Returns:
        A list of dicts with the config keys, the labelled axes, ``run_id`` and :data:`METRICS`.
    """
    from signalprop.sweep import sweep

    out = Path(workdir) / "sweep" / part
    res = sweep(from_jsonable(to_jsonable(grid)), out=out, executor=executor, progress=False,
                workers=workers if executor == "local" else 1)
    df = res.to_dataframe()
    rows = []
    for rec in df.to_dict("records"):
        row = {k: _clean(v) for k, v in rec.items()}
        if curves or layer_curves:
            r = res.record(row["run_id"])
            row["curves"] = {}
            for m in curves:
                s, v = r.scalar(m)
                row["curves"][m] = {"steps": s.tolist(), "values": v.tolist()}
            row["layer_curves"] = {}
            for m, role in layer_curves:
                layers = r.layer_names(role=role, metric=m)
                s, names, vals = r.matrix(m, layers)
                row["layer_curves"][m] = {
                    "steps": s.tolist(), "layers": names, "values": vals.tolist()
                }
        rows.append(row)
    return rows


def grid_options(config: dict[str, Any]) -> dict[str, Any]:
    """The executor settings a study's config carries (set by the runner, not hashed)."""
    return {"executor": config.get("executor", "local"), "workers": int(config.get("workers", 1))}


def select(rows: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    """The rows whose keys equal the given values."""
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def ok(row: dict[str, Any]) -> bool:
    """Finished without diverging."""
    return row.get("status") == "done"
