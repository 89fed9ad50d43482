"""Every example in ``examples/`` runs (as a user would run it: a subprocess) with small sizes,
and prints what its docstring promises.

The scripts run two at a time in a module fixture (each one mostly waits on imports); an example
whose optional dependency is missing is skipped with the reason.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TIMEOUT = 240

# name -> (command after the interpreter, modules it needs, [output sub-folder])
CASES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "plain_probe": (["examples/plain_probe.py", "--steps", "40"], ()),
    "doctor_own_model": (
        ["examples/doctor_own_model.py", "--steps", "40"],
        ("signalprop.doctor", "signalprop.report.doctor_page"),
    ),
    "critical_init_custom_activation": (
        ["examples/critical_init_custom_activation.py", "--depth", "20", "--width", "128"],
        ("signalprop.theory.torch_adapter",),
    ),
    "tensorboard_export": (["examples/tensorboard_export.py", "--steps", "30"], ("tensorboard",)),
    "lightning_callback": (
        ["examples/lightning_callback.py", "--steps", "12"],
        ("pytorch_lightning", "tensorboard"),
    ),
    "hf_trainer": (["examples/hf_trainer.py", "--steps", "6"],
                   ("transformers", "accelerate", "tensorboard")),
    "wandb_writer": (["examples/wandb_writer.py", "--steps", "12"], ("wandb",)),
    "mlflow_writer": (["examples/mlflow_writer.py", "--steps", "12"], ("mlflow",)),
    "distributed_ddp": (["examples/distributed_ddp.py", "--steps", "3"], ()),
    "ray_tune_asha": (["examples/ray_tune_asha.py", "--steps", "20", "--acts", "relu,sigmoid"],
                      ("ray.tune",)),
    "sweep_yaml": (
        ["-m", "signalprop", "sweep", "examples/sweep.yaml", "--no-progress"],
        ("signalprop.cli.sweep", "signalprop.sweep"),
    ),
}


def _missing(mods: tuple[str, ...]) -> str | None:
    for m in mods:
        try:
            found = importlib.util.find_spec(m) is not None
        except ImportError:  # a parent package is missing
            found = False
        if not found:
            return f"needs {m}, which is not installed / has not landed"
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}

    def run(name: str) -> object:
        args, mods = CASES[name]
        reason = _missing(mods)
        if reason is not None:
            return reason
        if name == "sweep_yaml" and not (EXAMPLES / "sweep.yaml").exists():
            return "examples/sweep.yaml has not landed"
        cmd = [sys.executable, *args, "--out", str(out / name)]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
        return proc, out / name

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CASES, pool.map(run, CASES), strict=True))
    return results


def _get(runs: dict[str, object], name: str) -> tuple[str, Path]:
    r = runs[name]
    if isinstance(r, str):
        pytest.skip(r)
    proc, out = r  # type: ignore[misc]
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, out


def test_every_example_is_covered() -> None:
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")}  # _common: a helper
    assert scripts <= set(CASES), f"examples without a test: {scripts - set(CASES)}"


def test_plain_probe(runs) -> None:
    stdout, out = _get(runs, "plain_probe")
    from signalprop.record import MODEL, Record

    rec = Record.load(out / "record.json.gz")
    assert rec.steps == [0, 10, 20, 30]
    assert rec.has("grad_norm") and rec.has("out_grad_norm")
    assert f"loss at step 30: {rec.get(30, MODEL, 'loss'):.4f}" in stdout
    assert "diagnosis:" in stdout


def test_doctor_own_model(runs) -> None:
    stdout, out = _get(runs, "doctor_own_model")
    assert "vanishing_gradients" in stdout  # 20 default-init sigmoid layers
    assert (out / "report.html").stat().st_size > 10_000
    assert (out / "report.json").exists() and (out / "record.json.gz").exists()


def test_critical_init_custom_activation(runs) -> None:
    stdout, _ = _get(runs, "critical_init_custom_activation")
    rows = dict(
        (m.group(1), (float(m.group(2)), float(m.group(3)), float(m.group(4))))
        for m in re.finditer(r"^(default init|critical_ init)\s+(\S+)\s+(\S+)\s+(\S+)$",
                             stdout, re.MULTILINE)
    )
    chi_d, pred_d, meas_d = rows["default init"]
    chi_c, pred_c, meas_c = rows["critical_ init"]
    assert chi_c == pytest.approx(1.0, abs=1e-3)
    assert chi_d < 0.5
    # 20 layers at width 128: measurement within a few x of the mean-field prediction
    assert 0.3 < meas_c < 3.0
    assert meas_d < 1e-3
    assert 0.1 < meas_d / pred_d < 10


def test_tensorboard_export(runs) -> None:
    stdout, out = _get(runs, "tensorboard_export")
    assert list((out / "live").glob("events.out.tfevents.*"))
    assert list((out / "from_record").glob("events.out.tfevents.*"))
    n = int(re.search(r"(\d+) scalar tags written live", stdout).group(1))
    assert n > 50
    assert "non-finite layers over the run: 0" in stdout


def test_lightning_callback(runs) -> None:
    stdout, out = _get(runs, "lightning_callback")
    assert "WARNING signalprop: vanishing_gradients" in stdout
    assert stdout.count("WARNING signalprop: vanishing_gradients") == 1
    assert "recorded 3 of 12 optimiser steps" in stdout
    for f in ("record.json.gz", "findings.json", "report.html"):
        assert (out / "signalprop" / f).exists(), f
    assert list(out.rglob("events.out.tfevents.*"))


def test_sweep_yaml(runs) -> None:
    stdout, out = _get(runs, "sweep_yaml")
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12  # 3 learning rates x 2 norms x 2 seeds
    assert {r["norm"] for r in rows} == {"none", "batch"}


def test_hf_trainer(runs) -> None:
    stdout, out = _get(runs, "hf_trainer")
    from signalprop.record import MODEL, Record

    rec = Record.load(out / "signalprop" / "record.json.gz")
    assert rec.steps == [0, 2, 4]
    for s in rec.steps:  # ours and the Trainer's pre-clip norm agree; clipping to 0.5
        assert rec.get(s, MODEL, "grad_norm_total") == pytest.approx(
            rec.get(s, MODEL, "trainer_grad_norm"), rel=1e-5)
        assert rec.get(s, MODEL, "grad_norm_total_clipped") <= 0.5 * (1 + 1e-5)
    assert "recorded 3 of 6 optimiser steps" in stdout
    assert (out / "signalprop" / "report.html").exists()


def test_wandb_writer(runs) -> None:
    stdout, out = _get(runs, "wandb_writer")
    assert "logged 3 steps" in stdout
    tables = [t for t in (out / "wandb").rglob("grad_norm*.table.json") if t.parent.name == "depth"]
    assert tables, "no depth-profile chart table was written"


def test_mlflow_writer(runs) -> None:
    stdout, _ = _get(runs, "mlflow_writer")
    m = re.search(r"(\d+) values of signalprop/grad_ratio_first_last, last (\S+)", stdout)
    assert m and int(m.group(1)) == 3
    assert float(m.group(2)) < 1e-3  # 8 sigmoid layers: the gradient vanishes at the input
    assert "signalprop/depth_grad_norm.png" in stdout


def test_distributed_ddp(runs) -> None:
    stdout, out = _get(runs, "distributed_ddp")
    diffs = [float(v) for v in re.findall(r"largest relative difference of .*: (\S+)", stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-5
    assert (out / "record.json.gz").exists()


def test_ray_tune_asha(runs) -> None:
    stdout, _ = _get(runs, "ray_tune_asha")
    rows = {m.group(1): (int(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(\w+)\s+(\d+)\s+(\S+)\s+(?:trained|stopped)", stdout,
                                 re.MULTILINE)}
    assert set(rows) == {"relu", "sigmoid"}, stdout
    # ASHA stopped the vanishing-gradient sigmoid net before the ReLU one finished
    assert rows["sigmoid"][0] < rows["relu"][0]
    assert rows["sigmoid"][1] < rows["relu"][1] - 3
