"""``signalprop doctor`` end to end: outputs, files, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from signalprop.cli import main

FACTORY = '''
import torch
from torch import nn

def factory():
    torch.manual_seed(0)
    x = torch.randn(128, 6)
    y = torch.randint(0, 3, (128,))
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), (x, y), nn.CrossEntropyLoss()

def two_things():
    return nn.Linear(6, 3), None

def no_params():
    return nn.ReLU(), (torch.randn(8, 6), torch.randint(0, 3, (8,))), nn.CrossEntropyLoss()

def vector_loss():
    m, d, _ = factory()
    return m, d, nn.CrossEntropyLoss(reduction="none")

def nan_data():
    m, (x, y), l = factory()
    x[0, 0] = float("nan")
    return m, (x, y), l

NOT_CALLABLE = 3
'''


@pytest.fixture()
def factory_file(tmp_path: Path) -> Path:
    p = tmp_path / "mymodel.py"
    p.write_text(FACTORY)
    return p


def run(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_example_prints_a_table(capsys: Any) -> None:
    rc, out, err = run(["doctor", "--example", "deep-sigmoid", "--steps", "20"], capsys)
    assert rc == 0, err
    assert "vanishing_gradients" in out and "critical" in out
    assert "what to try" in out and "batchnorm" in out


def test_json_is_the_only_stdout(factory_file: Path, capsys: Any) -> None:
    rc, out, err = run(["doctor", f"{factory_file}:factory", "--steps", "5", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)  # the whole of stdout is one JSON document
    # the stable keys, plus the mean-field explanation where the record supports one
    assert set(d) - {"explanation"} == {"schema", "findings", "summary", "trials", "meta"}
    assert d["meta"]["name"] == "factory" and d["meta"]["steps_run"] == 5


def test_out_writes_report_files(tmp_path: Path, capsys: Any) -> None:
    out_dir = tmp_path / "demo-out"
    rc, out, err = run(["doctor", "--example", "healthy", "--steps", "10", "--lr", "0.05",
                        "--optimizer", "momentum", "--seed", "3", "--out", str(out_dir)], capsys)
    assert rc == 0, err
    assert {p.name for p in out_dir.iterdir()} == {"report.html", "report.json",
                                                    "record.json.gz"}
    d = json.loads((out_dir / "report.json").read_text())
    assert d["meta"]["optimizer"] == "momentum" and d["meta"]["lr"] == 0.05
    assert d["meta"]["seed"] == 3
    assert "report.html" in out


def test_fail_on_findings(capsys: Any) -> None:
    rc, _, _ = run(["doctor", "--example", "deep-sigmoid", "--steps", "5", "--json",
                    "--fail-on-findings"], capsys)
    assert rc == 1


def test_list_examples(capsys: Any) -> None:
    rc, out, _ = run(["doctor", "--list-examples"], capsys)
    assert rc == 0 and "deep-sigmoid" in out and "healthy" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--example", "deep-sigmod"], "unknown example 'deep-sigmod'; did you mean"),
        (["{f}:nope"], "has no factory 'nope'; callables defined there: factory"),
        (["{f}:two_things"], "must return (model, data, loss_fn), got a tuple of length 2"),
        (["{f}:NOT_CALLABLE"], "is not callable"),
        (["{f}:no_params"], "no trainable parameters"),
        (["{f}:vector_loss"], "must return a scalar"),
        (["{f}:nan_data", "--validate"], "non-finite"),
        (["missing/file.py:factory"], "does not exist"),
        (["{f}"], "expected TARGET as path/to/file.py:factory"),
        (["{f}:factory", "--optimizer", "sgdd"], "unknown optimizer 'sgdd'"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], message: str, factory_file: Path, capsys: Any
) -> None:
    argv = ["doctor", *[a.replace("{f}", str(factory_file)) for a in args], "--steps", "2"]
    rc, out, err = run(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("signalprop: error: ")
    assert message in lines[0]
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("argv", [["doctor"], ["doctor", "x.py:f", "--example", "healthy"]])
def test_target_xor_example(argv: list[str], capsys: Any) -> None:
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "exactly one of TARGET" in err


def test_broken_factory_module(tmp_path: Path, capsys: Any) -> None:
    p = tmp_path / "broken.py"
    p.write_text("import torch\nraise RuntimeError('boom')\n")
    rc, _, err = run(["doctor", f"{p}:factory"], capsys)
    assert rc == 2 and "importing" in err and "RuntimeError: boom" in err


def test_console_script_end_to_end(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("signalprop")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "signalprop"]
    env = dict(os.environ, SIGNALPROP_THREADS="1")
    ok = subprocess.run(cmd + ["doctor", "--example", "healthy", "--steps", "5", "--json"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["summary"]["steps"] == 5  # stdout is exactly the JSON
