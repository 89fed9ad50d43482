"""The sweep runner: config schema, grids, the SQLite store, resuming after kill -9, executors."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from signalprop.cli import main
from signalprop.sweep import (
    PER_RUN,
    SCHEMA,
    expand_grid,
    group_runs,
    load,
    sweep,
    validate_config,
)

SMALL = {"data": "spiral", "data_args": {"n": 300}, "depth": 2, "width": 8, "steps": 12,
         "batch_size": 32, "record_every": 4}


def test_config_defaults_and_resolution():
    c = validate_config({})
    assert set(c) == set(SCHEMA)
    assert c["lr"] == 0.1 and c["clip_threshold"] == 0.0  # sgd's default lr, no clipping
    a = validate_config({"optimizer": "adam", "clip": "agc", "lr": "1e-3"})  # YAML 1.1 string
    assert a["lr"] == 1e-3 and a["eps"] == 1e-8 and a["clip_threshold"] == 0.01
    assert validate_config({"optimizer": "smorms3"})["eps"] == 1e-16
    assert validate_config({"depth": 3.0})["depth"] == 3


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"detph": 3}, r"unknown run-config key 'detph'; did you mean 'depth'\?.*valid choices"),
        ({"activation": "sigmiod"}, r"did you mean 'sigmoid'.*valid choices:.*tanh"),
        ({"optimizer": "adamw"}, r"valid choices:.*rmsprop.*smorms3"),
        ({"norm": "group"}, r"valid choices: none, batch, layer"),
        ({"depth": 0}, r"depth must be >= 1"),
        ({"depth": 2.5}, r"depth must be an integer"),
        ({"lr": -1}, r"lr must be > 0"),
        ({"lr": "fast"}, r"lr must be a number"),
        ({"residual": "yes"}, r"residual must be true or false"),
        ({"device": "gpu"}, r"device must be"),
        ({"data": "cifar"}, r"valid choices:.*digits"),
        ({"norm": "batch", "batch_size": 1}, r"batch_size >= 2"),
    ],
)
def test_config_errors_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        validate_config(bad)


def test_grid_expansion_labels_seeds_and_groups():
    grid = {
        "base": SMALL,
        "axes": {
            "lr": [0.01, 0.1],
            "remedy": {"plain": {}, "bn": {"norm": "batch"}, "adam": {"optimizer": "adam"}},
        },
        "seeds": 3,
    }
    specs = expand_grid(grid)
    assert len(specs) == 2 * 3 * 3
    assert {s.labels["remedy"] for s in specs} == {"plain", "bn", "adam"}
    assert [s.config["seed"] for s in specs[:3]] == [0, 1, 2]
    assert len({s.run_id for s in specs}) == len(specs)
    groups = group_runs(specs)
    assert len(groups) == 3  # lr and seed are per-run; norm and optimizer define populations
    for g in groups:
        shared = {k: v for k, v in g[0].config.items() if k not in PER_RUN}
        assert all({k: v for k, v in s.config.items() if k not in PER_RUN} == shared for s in g)
    assert [len(g) for g in group_runs(specs, max_size=4)] == [4, 2] * 3
    # duplicates collapse; a list of configs works too
    assert len(expand_grid([SMALL, SMALL, {**SMALL, "seed": 1}])) == 2
    with pytest.raises(ValueError, match="grid key"):
        expand_grid({"base": SMALL, "axis": {}})
    with pytest.raises(ValueError, match="named variants"):
        expand_grid({"base": SMALL, "axes": {"speed": [1, 2]}})


def test_sweep_local_table_records_and_skip(tmp_path):
    grid = {"base": SMALL, "axes": {"lr": [0.05, 0.5], "norm": ["none", "layer"]}, "seeds": 2}
    res = sweep(grid, out=tmp_path, progress=False)
    df = res.to_dataframe()
    assert len(df) == 8 and set(df.status) == {"done"}
    assert {"lr", "norm", "seed", "final_loss", "test_accuracy", "grad_ratio_init"} <= set(df)
    assert np.isfinite(df.final_loss).all() and (df.test_accuracy > 0).all()
    rec = res.record(df.run_id[0])
    assert rec.steps == [0, 4, 8, 11] and rec.has("grad_norm") and rec.has("saturated_frac")
    assert rec.meta["config"]["lr"] == df.lr[0]
    csv = res.to_csv(tmp_path / "r.csv")
    assert csv.read_text().count("\n") == 9
    finished = {r["run_id"]: r["finished"] for r in res.runs}
    again = sweep(grid, out=tmp_path, progress=False)  # nothing left to do
    assert {r["run_id"]: r["finished"] for r in again.runs} == finished
    # a grown grid runs only its new points; load() sees everything
    sweep({**grid, "seeds": 3}, out=tmp_path, progress=False)
    assert len(load(tmp_path)) == 12
    assert {r["run_id"]: r["finished"] for r in load(tmp_path).runs if r["run_id"] in finished} \
        == finished


def test_diverged_runs_carry_the_policys_reason(tmp_path):
    """A run stopped by the loss bound is 'diverged' with its reason in the table and in its
    stored record (whose meta holds its non-finite trivial loss, written as JSON)."""
    grid = {"base": {**SMALL, "data": "digits", "activation": "relu", "depth": 3, "width": 16,
                     "data_args": {}}, "axes": {"lr": [0.05, 100.0]}}
    df = sweep(grid, out=tmp_path, progress=False).to_dataframe().sort_values("lr")
    assert list(df.status) == ["done", "diverged"]
    assert df.diverged_reason.isna().iloc[0] and df.diverged_reason.iloc[1] == "loss_bound"
    rec = load(tmp_path).record(df.run_id.iloc[1])
    assert rec.meta["diverged_reason"] == "loss_bound"
    assert rec.meta["diverged_step"] == df.diverged_step.iloc[1]
    assert rec.meta["diverged_loss"] > 100 * max(rec.meta["initial_loss"], 1.0)


def test_failed_group_is_recorded_and_others_finish(tmp_path, monkeypatch):
    import signalprop.sweep.runner as runner

    real = runner.run_group

    def flaky(payload, callback=None):
        if payload[0][1]["norm"] == "layer":
            return real([(r, {**c, "data_args": {"n": -5}}) for r, c in payload], callback)
        return real(payload, callback)

    monkeypatch.setattr(runner, "run_group", flaky)
    res = sweep({"base": SMALL, "axes": {"norm": ["none", "layer"]}}, out=tmp_path,
                progress=False)
    df = res.to_dataframe().set_index("norm")
    assert df.loc["none", "status"] == "done" and df.loc["layer", "status"] == "failed"
    assert df.loc["layer", "error"]  # the error text is kept
    monkeypatch.setattr(runner, "run_group", real)
    res = sweep({"base": SMALL, "axes": {"norm": ["none", "layer"]}}, out=tmp_path,
                progress=False)
    assert set(res.to_dataframe().status) == {"done"}  # failed runs are retried


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from signalprop.sweep import sweep
    grid = {"base": {"data": "spiral", "data_args": {"n": 600}, "width": 32, "steps": 150,
                     "batch_size": 64, "record_every": 10},
            "axes": {"depth": [2, 3, 4, 5, 6, 7, 8, 9]}, "seeds": 2}
    sweep(grid, out=sys.argv[1], progress=False)
    """
)


def _done_rows(db: Path) -> dict[str, tuple]:
    con = sqlite3.connect(str(db))
    try:
        rows = con.execute(
            "SELECT run_id, status, metrics, record, finished FROM runs "
            "WHERE status IN ('done', 'diverged')"
        ).fetchall()
    finally:
        con.close()
    return {r[0]: r[1:] for r in rows}


def test_kill_minus_9_and_resume(tmp_path):
    out = tmp_path / "sw"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    db = out / "sweep.db"
    deadline = time.time() + 120
    before: dict[str, tuple] = {}
    try:
        while time.time() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    before = _done_rows(db)
                except sqlite3.OperationalError:
                    before = {}
                if len(before) >= 2:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = _done_rows(db)  # what was committed when the process died
    assert 2 <= len(before) < 16  # killed part-way
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True, timeout=300)
    after = _done_rows(db)
    assert len(after) == 16  # every run exactly once (run_id is the primary key)
    con = sqlite3.connect(str(db))
    assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 16
    con.close()
    for rid, row in before.items():
        assert after[rid] == row  # finished runs were not touched
    # and the resumed runs match an uninterrupted run of the same configs
    df = load(out).to_dataframe().set_index("run_id")
    fresh_grid = {"base": {"data": "spiral", "data_args": {"n": 600}, "width": 32, "steps": 150,
                           "batch_size": 64, "record_every": 10},
                  "axes": {"depth": [9]}, "seeds": 2}
    fresh = sweep(fresh_grid, out=tmp_path / "fresh", progress=False).to_dataframe()
    for _, r in fresh.iterrows():
        assert df.loc[r.run_id, "final_loss"] == pytest.approx(r.final_loss, rel=1e-6)


def test_cli_sweep(tmp_path, capsys):
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(
        "base: {data: spiral, data_args: {n: 300}, depth: 2, width: 8, steps: 6, "
        "batch_size: 32}\naxes: {lr: [1e-2, 0.1]}\nseeds: 2\n"
    )
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "done: 4" in out
    assert (tmp_path / "o" / "results.csv").read_text().count("\n") == 5
    cfg.write_text("base: {data: spiral, depht: 2}\n")
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "p")]) == 2
    assert "did you mean 'depth'" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2


def test_example_config_runs(tmp_path, capsys):
    example = Path(__file__).parents[2] / "examples" / "sweep.yaml"
    specs = expand_grid(example)
    assert len(specs) == 12 and len(group_runs(specs)) == 2
    assert main(["sweep", str(example), "--out", str(tmp_path), "--no-progress"]) == 0
    df = load(tmp_path).to_dataframe()
    assert len(df) == 12 and set(df.status) <= {"done", "diverged"}


def test_process_and_ray_executors_match_local(tmp_path):
    grid = {"base": SMALL, "axes": {"lr": [0.05, 0.5], "depth": [2, 3]}, "seeds": 2}
    local = sweep(grid, out=tmp_path / "local", progress=False).to_dataframe()
    pooled = sweep(grid, out=tmp_path / "pool", progress=False, workers=2).to_dataframe()
    np.testing.assert_allclose(pooled.final_loss, local.final_loss, rtol=1e-6)
    assert list(pooled.run_id) == list(local.run_id)


def test_ray_executor(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install signalprop[ray])")
    grid = {"base": SMALL, "axes": {"lr": [0.05, 0.5], "depth": [2, 3]}, "seeds": 2}
    local = sweep(grid, out=tmp_path / "local", progress=False).to_dataframe()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = sweep(grid, out=tmp_path / "ray", executor="ray", progress=False)
    finally:
        ray.shutdown()
    df = res.to_dataframe()
    assert len(df) == 8 and set(df.status) == {"done"}
    np.testing.assert_allclose(df.final_loss, local.final_loss, rtol=1e-6)
    envs = [r["env"] for r in res.runs]
    assert all(e["pid"] != os.getpid() for e in envs)  # trained in Ray workers
    assert json.loads(json.dumps(res.record(df.run_id[0]).to_dict()))["data"]


def test_signalprop_sweep_is_callable_even_after_importing_the_package(tmp_path):
    import signalprop
    import signalprop.sweep

    res = signalprop.sweep({"base": SMALL}, out=tmp_path, progress=False)
    assert res.status_counts() == {"done": 1}
    assert len(signalprop.sweep.load(tmp_path)) == 1


def test_one_sweep_process_per_directory(tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sweep would hold it
        with pytest.raises(RuntimeError, match="another sweep is running"):
            sweep({"base": SMALL}, out=tmp_path, progress=False)
    assert sweep({"base": SMALL}, out=tmp_path, progress=False).status_counts() == {"done": 1}


def test_ray_resources_request_a_gpu_for_cuda_populations():
    from signalprop.sweep.runner import ray_resources

    def group(device):
        return expand_grid({"base": {**SMALL, "device": device}})

    assert ray_resources(group("cpu")) == {"num_cpus": 1, "num_gpus": 0}
    assert ray_resources(group("cuda")) == {"num_cpus": 1, "num_gpus": 1}
    assert ray_resources(group("cuda:1"))["num_gpus"] == 1
    assert ray_resources(group("auto"), cluster_gpus=0)["num_gpus"] == 0
    assert ray_resources(group("auto"), cluster_gpus=4)["num_gpus"] == 1
