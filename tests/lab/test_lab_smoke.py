"""Every study runs end to end in its smoke configuration (each module's ``SMOKE`` overrides:
seconds per study), produces its conclusion and figures, and the report embeds them all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from markupsafe import escape

from signalprop.lab import STUDY_NAMES, get_study
from signalprop.lab.base import VERDICTS, read_json
from signalprop.lab.runner import run_smoke, run_study


def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke lab per test session, shared with the browser test (a second call finds the
    stored results and only redraws the figures)."""
    out = tmp_path_factory.getbasetemp() / "lab-smoke"
    run_smoke(out)
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smoke_dir(tmp_path_factory)


@pytest.mark.parametrize("name", STUDY_NAMES)
def test_study_runs_in_smoke_configuration(lab: Path, name: str) -> None:
    d = lab / name
    meta = read_json(d / "meta.json")
    assert meta["status"] in ("done", "cached"), meta.get("traceback")
    concl = read_json(d / "conclusion.json")
    assert concl["verdict"] in VERDICTS
    assert concl["sentence"] and concl["claim"] == get_study(name).CLAIM
    assert concl["numbers"]
    figs = [d / f for f in meta["figures"]]
    assert figs, f"{name} drew no figure"
    for f in figs:
        raw = f.read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000, f
    results = read_json(d / "results.json")
    assert results["config_hash"] == meta["config_hash"]


def test_report_has_every_study_and_figure(lab: Path) -> None:
    page = (lab / "index.html").read_text()
    n_figs = 0
    for name in STUDY_NAMES:
        mod = get_study(name)
        assert f'href="#study-{name}"' in page
        assert f'id="study-{name}"' in page
        n_figs += len(read_json(lab / name / "meta.json")["figures"])
        # captions come from the study module
        for caption in getattr(mod, "CAPTIONS", {}).values():
            assert str(escape(caption))[:30] in page
    imgs = re.findall(r'<img src="data:image/png;base64,', page)
    assert len(imgs) == n_figs
    # one index line per study, with its verdict
    index = page.split('<h2 id="index">')[1].split("</table>")[0]
    assert index.count("<tr>") == len(STUDY_NAMES) + 1
    assert "Configuration" in page and "Timings and environment" in page


def test_sweep_based_study_resumes_from_its_database(
    lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropping the stored results re-runs the study, but nothing is trained again: the sweep
    database serves the MLP runs and the cache the RNN runs."""
    import shutil

    import signalprop.lab.clipping as clipping
    import signalprop.sweep.runner as sweep_runner

    src = lab / "clipping"
    shutil.copytree(src, tmp_path / "clipping")
    (tmp_path / "clipping" / "results.json").unlink()
    before = read_json(src / "conclusion.json")

    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep_runner, "run_group", no_training)
    monkeypatch.setattr(clipping, "_rnn_one", no_training)
    o = run_study("clipping", tmp_path, quick=True, overrides=dict(clipping.SMOKE))
    assert o.status == "done", o.error
    assert o.conclusion.to_dict()["sentence"] == before["sentence"]


@pytest.mark.slow
def test_sweep_parts_run_on_ray(lab: Path, tmp_path: Path) -> None:
    """``--executor ray``: the sweep-based part runs as Ray tasks on a local instance and gives
    the same conclusion as the local executor (same seeds, same populations)."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    mod = get_study("bn-depth")
    o = run_study("bn-depth", tmp_path, quick=True, executor="ray", overrides=dict(mod.SMOKE))
    assert o.status == "done", o.error
    local = read_json(lab / "bn-depth" / "results.json")["data"]["train"]
    remote = read_json(tmp_path / "bn-depth" / "results.json")["data"]["train"]
    key = lambda r: (r["depth"], r["residual"], r["seed"])  # noqa: E731
    for a, b in zip(sorted(local, key=key), sorted(remote, key=key), strict=True):
        assert key(a) == key(b) and a["status"] == b["status"]
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=0.02)
