"""Saved records are first-class: ``signalprop diagnose RECORD`` and ``signalprop report RECORD
--out DIR`` give the doctor's findings and page for a record written by doctor or a Probe."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import signalprop
from signalprop.cli import main
from signalprop.probe import Probe

from ..helpers import train_probed


def _deep_sigmoid(depth: int = 12) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 3))


@pytest.fixture(scope="module")
def doctor_out(tmp_path_factory):
    torch.manual_seed(0)
    x, y = torch.randn(128, 16), torch.randint(0, 3, (128,))
    rep = signalprop.doctor(_deep_sigmoid(), (x, y), nn.CrossEntropyLoss(), steps=30,
                            progress=False)
    out = tmp_path_factory.mktemp("doctor")
    rep.save(out)
    return rep, out


def _imgs(html: str) -> int:
    return len(re.findall(r"<img\b", html))


def test_diagnose_json_gives_the_doctors_findings(doctor_out, capsys) -> None:
    rep, out = doctor_out
    assert rep.findings, "the deep sigmoid net should give findings"
    assert main(["diagnose", str(out / "record.json.gz"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = json.loads((out / "report.json").read_text())
    assert got["findings"] == want["findings"]
    assert got["summary"]["prescriptions"] == want["summary"]["prescriptions"]
    # a folder holding record.json.gz works as well
    assert main(["diagnose", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["findings"] == want["findings"]


def test_report_record_writes_the_doctors_page(doctor_out, tmp_path, capsys) -> None:
    rep, out = doctor_out
    dest = tmp_path / "page"
    assert main(["report", str(out / "record.json.gz"), "--out", str(dest)]) == 0
    assert capsys.readouterr().out.strip() == str(dest / "report.html")
    ours = (dest / "report.html").read_text()
    theirs = (out / "report.html").read_text()
    assert _imgs(ours) == _imgs(theirs) > 0  # the same figures
    for f in rep.findings:
        assert f.kind in ours
    for p in rep.prescriptions[:3]:
        assert p.remedy in ours


def test_probe_record_terminal_output(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = _deep_sigmoid()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    probe = train_probed(model, Probe(model, optimizer=opt), opt, [(x, y)] * 8)
    path = probe.record.save(tmp_path / "run.json.gz")
    assert main(["diagnose", str(path), "--fail-on-findings"]) == 1
    text = capsys.readouterr().out
    assert "vanishing_gradients" in text


def test_bad_record_paths(tmp_path, capsys) -> None:
    assert main(["diagnose", str(tmp_path / "missing.json.gz")]) == 2
    assert "no record at" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["diagnose", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not a signalprop record" in err and err.count("\n") == 1
    assert main(["report", str(bad)]) == 2
    assert "--out" in capsys.readouterr().err


def test_sweep_json(tmp_path, capsys) -> None:
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(
        "base: {data: spiral, data_args: {n: 200}, depth: 2, width: 8, steps: 4, "
        "batch_size: 32}\naxes: {lr: [1e-2, 0.1]}\n"
    )
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)  # nothing but JSON on stdout
    assert got["status"] == {"done": 2} and got["n_runs"] == 2
    from signalprop.sweep import load

    res = load(tmp_path / "o")
    want = {r["run_id"]: r["metrics"]["final_loss"] for r in res.runs}
    assert {r["run_id"]: r["metrics"]["final_loss"] for r in got["runs"]} == pytest.approx(want)


def test_lab_run_json(tmp_path, capsys, monkeypatch) -> None:
    from pathlib import Path

    import signalprop.lab.runner as runner
    from signalprop.lab.base import Conclusion

    def fake_run_lab(names, out, **kw):  # the CLI's plumbing only; the lab has its own tests
        return [runner.StudyOutcome(
            name=names[0], status="done", figures=[Path(out) / "f.png"], run_s=1.5, total_s=2.0,
            conclusion=Conclusion(claim="c", sentence="s", verdict="supports",
                                  numbers={"x": float("nan"), "y": 2.0}))]

    monkeypatch.setattr(runner, "run_lab", fake_run_lab)
    name = runner.resolve_names(["all"])[0]
    assert main(["lab", "run", name, "--out", str(tmp_path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    (study,) = got["studies"]
    assert study["name"] == name and study["status"] == "done"
    assert study["conclusion"]["verdict"] == "supports"
    assert study["conclusion"]["numbers"] == {"x": "NaN", "y": 2.0}  # record.py's policy, valid JSON
