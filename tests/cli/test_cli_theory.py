"""``signalprop theory ...`` end to end (in-process through ``main``)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from signalprop.cli import main


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_critical_json(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "theory", "critical", "--activation", "tanh", "--sigma-b2", "0.05",
                 "--json")
    assert {"sigma_w", "sigma_w2", "q_star", "chi_1"} <= set(d)
    assert d["sigma_w"] == pytest.approx(1.327, abs=5e-4)
    assert d["sigma_w2"] == pytest.approx(d["sigma_w"] ** 2)
    assert d["chi_1"] == pytest.approx(1.0, abs=1e-9) and d["reason"] is None
    relu = run_json(capsys, "theory", "critical", "--activation", "relu", "--json")
    assert relu["sigma_w"] == pytest.approx(math.sqrt(2)) and relu["q_star"] is None


def test_critical_none_exits_zero_with_reason(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "theory", "critical", "--activation", "softplus", "--json")
    assert d["sigma_w"] is None and d["sigma_w2"] is None
    assert "infinity" in d["reason"]
    assert main(["theory", "critical", "--activation", "relu", "--sigma-b2", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "no critical point" in out and "reason:" in out


def test_critical_human_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["theory", "critical", "-a", "tanh", "--sigma-b2", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "edge of chaos" in out and "sigma_w   = 1.327" in out and "q*" in out


def test_critical_user_callable_by_import_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = tmp_path / "my_acts.py"
    mod.write_text(textwrap.dedent("""
        import torch

        def isru(x):
            return x * torch.rsqrt(1 + x * x)

        NOT_CALLABLE = 3
    """))
    monkeypatch.chdir(tmp_path)
    d = run_json(capsys, "theory", "critical", "-a", "my_acts:isru", "--sigma-b2", "0.1",
                 "--json")
    assert d["sigma_w"] > 1.0 and d["chi_1"] == pytest.approx(1.0, abs=1e-7)
    d2 = run_json(capsys, "theory", "critical", "-a", f"{mod}:isru", "--sigma-b2", "0.1",
                  "--json")
    assert d2["sigma_w"] == pytest.approx(d["sigma_w"], rel=1e-10)
    t = run_json(capsys, "theory", "critical", "-a", "torch:tanh", "--json")
    assert t["sigma_w"] == pytest.approx(1.0, abs=1e-6)
    # errors: one line, exit 2, no evaluation of strings
    for bad, msg in [("my_acts:nope", "has no activation 'nope'"), ("my_acts:NOT_CALLABLE", "not callable"),
                     ("no_such_module_xyz:f", "cannot import"),
                     ("__import__('os').getcwd():x", "module path"),
                     (f"{tmp_path}/missing.py:f", "does not exist")]:
        assert main(["theory", "critical", "-a", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("signalprop: error:") and msg in err


def test_critical_bad_name_and_params(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["theory", "critical", "-a", "tahn"]) == 2
    assert "did you mean 'tanh'" in capsys.readouterr().err
    d = run_json(capsys, "theory", "critical", "-a", "leaky_relu", "-p", "negative_slope=0.5",
                 "--json")
    assert d["sigma_w2"] == pytest.approx(2 / 1.25)
    assert main(["theory", "critical", "-a", "tanh", "-p", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_bn_rate(capsys: pytest.CaptureFixture[str]) -> None:
    d = run_json(capsys, "theory", "bn-rate", "--activation", "relu", "--batch-size", "32",
                 "--json")
    assert d["rate"] == pytest.approx(1.5219528, rel=1e-6)
    assert d["large_batch_limit"] == pytest.approx(math.pi / (math.pi - 1))
    lin = run_json(capsys, "theory", "bn-rate", "-a", "linear", "-B", "8", "--json")
    assert lin["rate"] == pytest.approx(1.2)
    assert main(["theory", "bn-rate", "-a", "tanh", "-B", "16"]) == 0
    assert "per layer" in capsys.readouterr().out
    assert main(["theory", "bn-rate", "-a", "relu", "-B", "3"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_phase_diagram_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "phase.png"
    assert main(["theory", "phase", "--activation", "tanh", "--out", str(out),
                 "--resolution", "12", "--sigma-b2-max", "0.3"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "critical line found at 25/25" in capsys.readouterr().out
    assert main(["theory", "phase", "-a", "tanh", "--out", str(tmp_path / "no/dir/x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_phase_figure_contents() -> None:
    import numpy as np

    from signalprop.cli.theory import plot_phase_diagram
    from signalprop.theory import critical_line, phase_diagram

    pd = phase_diagram("tanh", np.linspace(0.5, 2.5, 10), np.linspace(0.0, 0.3, 6))
    fig = plot_phase_diagram(pd, critical_line("tanh", [0.0, 0.1, 0.3]), "tanh")
    ax = fig.axes[0]
    assert "sigma_w" in ax.get_xlabel() and "sigma_b" in ax.get_ylabel()
    assert "chi_1" in fig.axes[1].get_ylabel()  # the colour bar
    assert any("critical" in t.get_text() for t in ax.get_legend().get_texts())
    # ordered (blue, chi_1 < 1) on the left, chaotic on the right
    assert pd["chi_1"][0, 0] < 1 < pd["chi_1"][0, -1]
