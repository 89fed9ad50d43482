"""A study's independent cells in worker processes: the same results as the serial path, bit for
bit, each cell cached on its own (a rerun computes only the missing ones)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from signalprop.lab import base as B
from signalprop.lab import get_study
from signalprop.lab.runner import study_config


@pytest.fixture(autouse=True, scope="module")
def _one_pool() -> Any:
    """The tests share one pool of 2 workers, as the studies of a lab run do (starting workers
    and their imports is most of the cost of these tiny cells)."""
    from signalprop._lifeline import shared_worker_pool

    with shared_worker_pool(2):
        yield


#: Timings differ from run to run; every other value must be identical.
TIMING_KEYS = {"wall_s", "wall_time"}


def _exact(obj: Any) -> str:
    """A canonical text of ``obj`` without its timings (NaN compares equal to NaN here)."""

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING_KEYS}
        if isinstance(x, (list, tuple)):
            return [strip(v) for v in x]
        return x

    return json.dumps(B.to_jsonable(strip(obj)), sort_keys=True)


def _square(x: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(x)  # a cell seeds what it draws from
    return {"x": x, "y": x * x, "noise": torch.randn(3).tolist()}


def _boom(x: int) -> dict[str, Any]:
    raise RuntimeError(f"cell {x} must come from the cache")


def _slow_boom(x: int) -> dict[str, Any]:
    time.sleep(1.5)
    raise RuntimeError(f"cell {x} failed")


#: Tiny versions of studies whose cells train independently (on top of their SMOKE overrides).
TINY = {
    # the local cells: RBF stacks calibrated from data, scaled weight standardisation,
    # layer-wise rates (the remedies cabinet on nn.Modules)
    "any-nonlinearity": ({"seeds": 2, "steps": 10, "width": 8,
                          "remedies": ["none", "scaled", "layerwise"]},
                         lambda mod, config, out: mod._local_part(config, out)[0]),
    "recurrent": ({"lengths": [5], "steps": 10, "seeds": [0, 1], "train_size": 64,
                   "val_size": 32, "test_size": 32},
                  lambda mod, config, out: mod.run(config, out)),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_study_cells_in_workers_equal_serial(name: str, tmp_path: Path) -> None:
    """A study's cells in 2 worker processes give exactly what the serial path gives (each cell
    seeds its own state: results do not depend on the process or the order)."""
    mod = get_study(name)
    overrides, part = TINY[name]
    out = {}
    for workers in (1, 2):
        config = {**study_config(mod, name, True, {**mod.SMOKE, **overrides}),
                  "workers": workers}
        out[workers] = part(mod, config, tmp_path / f"w{workers}")
    assert len(out[1]) >= 4 and _exact(out[1]) == _exact(out[2])
    caches = [sorted(p.name for p in (tmp_path / f"w{w}" / "cache").iterdir()) for w in (1, 2)]
    assert caches[0] == caches[1] and len(caches[0]) >= 4  # one file per cell, same names


def test_cached_cells_resume_and_keep_order(tmp_path: Path) -> None:
    serial = B.cached_cells(tmp_path / "a", [B.Cell({"x": x}, _square, (x,)) for x in range(4)])
    # half of the cells are cached: a rerun in workers computes only the others (the cached
    # ones would raise if they ran), and returns the results in the cells' order
    B.cached_cells(tmp_path / "b", [B.Cell({"x": x}, _square, (x,)) for x in (0, 2)])
    cells = [B.Cell({"x": x, "workers": 3}, _boom if x in (0, 2) else _square, (x,))
             for x in range(4)]
    par = B.cached_cells(tmp_path / "b", cells, workers=2)
    assert _exact(par) == _exact(serial)
    assert [r["y"] for r in par] == [0, 1, 4, 9]
    # all cached now: nothing runs
    again = B.cached_cells(tmp_path / "b", [B.Cell({"x": x}, _boom, (x,)) for x in range(4)],
                           workers=2)
    assert _exact(again) == _exact(serial)


def test_cached_cells_keep_finished_cells_when_one_fails(tmp_path: Path) -> None:
    cells = [B.Cell({"x": 1}, _square, (1,)), B.Cell({"x": 2}, _slow_boom, (2,))]
    with pytest.raises(RuntimeError, match="cell 2 failed"):
        B.cached_cells(tmp_path, cells, workers=2)
    # the finished cell was stored as it arrived
    assert B.cached(tmp_path, {"x": 1}, lambda: _boom(1)) == _square(1)


def _pid(x: int) -> int:
    import os

    return os.getpid()


def test_lab_lends_one_pool_to_every_part(tmp_path: Path) -> None:
    """Inside the lab's shared pool, parts reuse the same warm workers (started once); a part
    that fails stops them, and the next part gets fresh ones."""
    from signalprop._lifeline import shared_worker_pool

    def pids(sub: str, fn: Any = _pid) -> set[int]:
        return set(B.cached_cells(tmp_path / sub, [B.Cell({"x": x}, fn, (x,)) for x in range(6)],
                                  workers=2))

    with shared_worker_pool(2):
        first, second = pids("a"), pids("b")
        assert len(first | second) <= 2  # the same (at most 2) processes both times
        with pytest.raises(RuntimeError, match="must come from the cache"):
            pids("c", _boom)
        assert not pids("d") & first
