"""Fault suite, part 2: Ctrl-C and ``kill -9`` of doctor, sweep and lab (issue 16).

Each test runs the real command in a subprocess, interrupts it, and checks that (1) no process it
started survives its death by more than a few seconds, and (2) what it wrote resumes to, or
equals, the result of an uninterrupted run. Tiny configurations keep each test to seconds.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import signalprop
from signalprop._lifeline import descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="uses /proc and POSIX signals")

SRC = str(Path(signalprop.__file__).resolve().parent.parent)

#: A user model that marks the moment training starts (its first forward in training mode), so
#: that the signal lands mid-training however slow the machine is.
FACTORY = '''
import os, torch
from torch import nn

class Marked(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        self.marked = False

    def forward(self, x):
        if self.training and not self.marked:
            open(os.environ["MARK_FILE"], "w").close()
            self.marked = True
        return self.net(x)

def factory():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return Marked(), (x, y), nn.CrossEntropyLoss()
'''

GRID = {"base": {"data": "spiral", "data_args": {"n": 200}, "depth": 3, "width": 16,
                 "steps": 4000, "batch_size": 32, "record_every": 500},
        "axes": {"activation": ["tanh", "relu"]}, "seeds": 2}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SIGNALPROP_THREADS="1", **extra)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Proc:
    """A command in its own session, its descendants tracked while it lives."""

    def __init__(self, argv: list[str], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.err_path = tmp / f"err-{time.monotonic_ns()}.txt"
        self.p = subprocess.Popen(argv, env=env or _env(), stdout=subprocess.DEVNULL,
                                  stderr=open(self.err_path, "w"), start_new_session=True)
        self.seen: dict[int, str] = {}

    def watch(self) -> dict[int, str]:
        self.seen.update(descendants(self.p.pid))
        return self.seen

    @property
    def err(self) -> str:
        return self.err_path.read_text()


@pytest.fixture()
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for pr in started:  # whatever a failed test left behind, by pid (never by name)
        if pr.p.poll() is None:
            pr.p.kill()
            pr.p.wait()
        for pid in _alive(pr.seen):
            os.kill(pid, signal.SIGKILL)


def _alive(pids: dict[int, str]) -> list[int]:
    """The processes of ``pids`` still running (same start time; zombies count as dead)."""
    out = []
    for pid, start in pids.items():
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()
        if rest[0] != "Z" and rest[19] == start:
            out.append(pid)
    return out


def _wait(pred: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return pred()


def _no_orphans(pids: dict[int, str], within: float = 5.0) -> list[int]:
    _wait(lambda: not _alive(pids), within)
    return _alive(pids)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "signalprop", *args]


# --- doctor -----------------------------------------------------------------------------------
def _doctor_reference(factory: Path, steps: int) -> Any:
    """The same doctor run, uninterrupted, for ``steps`` steps (in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_faults_factory", factory)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, data, loss_fn = mod.factory()
        return signalprop.doctor(model, data, loss_fn, steps=steps, progress=False, seed=0)
    finally:
        torch.set_num_threads(threads)


def test_doctor_ctrl_c_keeps_a_report_equal_to_an_uninterrupted_run(
    tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "marked.py"
    f.write_text(FACTORY)
    mark, out = tmp_path / "started", tmp_path / "out"
    pr = Proc(_cli("doctor", f"{f}:factory", "--steps", "1000000000", "--out", str(out),
                   "--json"), tmp_path, _env(MARK_FILE=str(mark)))
    procs.append(pr)
    assert _wait(lambda: mark.exists() or pr.p.poll() is not None, 120), pr.err
    time.sleep(0.2)
    pr.p.send_signal(signal.SIGINT)
    rc = pr.p.wait(60)
    assert rc == 130, pr.err
    assert "Traceback" not in pr.err
    assert "interrupted after" in pr.err and "partial record and report in" in pr.err
    rep = json.loads((out / "report.json").read_text())
    n = rep["meta"]["steps_run"]
    assert n >= 1 and rep["meta"]["interrupted"] is True
    assert len(signalprop.Record.load(out / "record.json.gz").steps) >= 1
    # nothing trained was lost: the partial report is the report of an n-step run
    monkeypatch.setenv("MARK_FILE", str(tmp_path / "ref-mark"))
    ref = _doctor_reference(f, n)
    assert ref.meta["steps_run"] == n
    assert rep["summary"]["initial_loss"] == ref.summary()["initial_loss"]
    assert rep["summary"]["final_loss"] == ref.summary()["final_loss"]


def test_doctor_kill_9_leaves_no_half_written_files(tmp_path: Path, procs: list[Proc]) -> None:
    f = tmp_path / "marked.py"
    f.write_text(FACTORY)
    mark, out = tmp_path / "started", tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"previous": true}')
    pr = Proc(_cli("doctor", f"{f}:factory", "--steps", "1000000000", "--out", str(out)),
              tmp_path, _env(MARK_FILE=str(mark)))
    procs.append(pr)
    assert _wait(lambda: mark.exists() or pr.p.poll() is not None, 120), pr.err
    pr.watch()
    pr.p.kill()
    assert pr.p.wait(30) == -signal.SIGKILL
    assert _no_orphans(pr.seen) == []
    # the previous result is intact and no temporary file is left behind
    assert json.loads((out / "report.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


# --- sweep ------------------------------------------------------------------------------------
def _sweep_metrics(out: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    from signalprop.sweep import SweepResult

    return {r["run_id"]: (r["status"], r["metrics"]) for r in SweepResult(out).runs}


def _sweep_one_thread(out: Path) -> None:
    """GRID swept (or resumed) into ``out`` in this process on one thread, as the workers run."""
    from signalprop.sweep import sweep

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sweep(copy.deepcopy(GRID), out=out, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:

    out = tmp_path_factory.mktemp("sweep-ref")
    _sweep_one_thread(out)
    return _sweep_metrics(out)


def _start_sweep(tmp_path: Path, procs: list[Proc]) -> tuple[Proc, Path]:
    import yaml

    cfg, out = tmp_path / "grid.yaml", tmp_path / "sw"
    cfg.write_text(yaml.safe_dump(GRID))
    pr = Proc(_cli("sweep", str(cfg), "--out", str(out), "--workers", "2", "--no-progress"),
              tmp_path)
    procs.append(pr)
    # both workers started (they arm their parent-death signal before loading torch)
    assert _wait(lambda: len([p for p in pr.watch()]) >= 3 or pr.p.poll() is not None, 120), \
        pr.err
    time.sleep(1.0)
    pr.watch()
    assert pr.p.poll() is None, "the sweep finished before it could be interrupted"
    return pr, out


def _resume_and_compare(out: Path, reference: dict[str, Any]) -> None:
    _sweep_one_thread(out)
    got = _sweep_metrics(out)
    assert set(got) == set(reference)
    for rid, (status, metrics) in reference.items():
        assert got[rid][0] == status
        for k, v in metrics.items():
            if k in ("population_wall_time",):
                continue
            assert got[rid][1][k] == v or (v != v and got[rid][1][k] != got[rid][1][k]), (k, v)


def test_sweep_kill_9_no_orphans_and_resume_is_identical(
    tmp_path: Path, procs: list[Proc], sweep_reference: dict[str, Any]
) -> None:
    pr, out = _start_sweep(tmp_path, procs)
    pr.p.kill()
    assert pr.p.wait(30) == -signal.SIGKILL
    assert len(pr.seen) >= 2
    assert _no_orphans(pr.seen) == [], "workers survived the sweep's kill -9"
    _resume_and_compare(out, sweep_reference)


def test_sweep_ctrl_c_no_orphans_and_resume_is_identical(
    tmp_path: Path, procs: list[Proc], sweep_reference: dict[str, Any]
) -> None:
    pr, out = _start_sweep(tmp_path, procs)
    os.killpg(pr.p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    rc = pr.p.wait(60)
    assert rc != 0
    assert _no_orphans(pr.seen) == [], "workers survived the sweep's Ctrl-C"
    assert "Traceback" not in pr.err, pr.err
    _resume_and_compare(out, sweep_reference)


# --- lab --------------------------------------------------------------------------------------
# the lab's clipping study, shrunk (its MLP part is a sweep run by worker processes)
LAB_DRIVER = '''
import copy, sys
from signalprop.lab import get_study
from signalprop.lab.runner import run_study

if __name__ == "__main__":  # spawned workers re-import this file
    ov = copy.deepcopy(get_study("clipping").SMOKE)
    ov["mlp"]["steps"] = LAB_STEPS
    o = run_study("clipping", sys.argv[1], quick=True, overrides=ov, workers=int(sys.argv[2]))
    sys.exit(0 if o.status in ("done", "cached") else 1)
'''
LAB_STEPS = 500


def _run_lab_here(out: Path) -> None:
    """The same study, uninterrupted or resumed, in this process (one worker)."""
    from signalprop.lab import get_study
    from signalprop.lab.runner import run_study

    ov = copy.deepcopy(get_study("clipping").SMOKE)
    ov["mlp"]["steps"] = LAB_STEPS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        o = run_study("clipping", out, quick=True, overrides=ov, workers=1)
    finally:
        torch.set_num_threads(threads)
    assert o.status in ("done", "cached"), o.error


def _lab_rows(out: Path) -> list[Any]:
    d = json.loads((out / "clipping" / "results.json").read_text())
    return d["data"]["mlp"] if "data" in d else d["mlp"]


def test_lab_kill_9_and_ctrl_c_no_orphans_and_resume_is_identical(
    tmp_path: Path, procs: list[Proc]
) -> None:
    driver = tmp_path / "lab_driver.py"
    driver.write_text(LAB_DRIVER.replace("LAB_STEPS", str(LAB_STEPS)))
    ref = tmp_path / "ref"
    _run_lab_here(ref)
    want = _lab_rows(ref)
    # both interrupted runs start together (their start-up overlaps)
    runs = {how: Proc([sys.executable, str(driver), str(tmp_path / how), "2"], tmp_path)
            for how in ("kill", "int")}
    procs.extend(runs.values())
    for pr in runs.values():
        assert _wait(lambda pr=pr: len(pr.watch()) >= 3 or pr.p.poll() is not None, 120), \
            pr.err
    time.sleep(0.5)
    for how, pr in runs.items():
        pr.watch()
        assert pr.p.poll() is None, "the study finished before it could be interrupted"
        if how == "kill":
            pr.p.kill()
        else:
            os.killpg(pr.p.pid, signal.SIGINT)
    for how, pr in runs.items():
        assert pr.p.wait(60) != 0
        assert _no_orphans(pr.seen) == [], f"lab workers survived ({how})"
        _run_lab_here(tmp_path / how)  # resumes: finished runs kept, the others trained again
        assert _lab_rows(tmp_path / how) == want
