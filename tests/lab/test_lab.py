"""The lab's framework: study registry, conclusions, caching/resuming, the report, the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from signalprop.cli import main
from signalprop.lab import STUDIES, STUDY_NAMES, get_study
from signalprop.lab import base as B
from signalprop.lab.report import build_report
from signalprop.lab.runner import resolve_names, run_study

CONTRACT_NAMES = [
    "saturation", "learning-rate", "initialisation", "any-nonlinearity", "remedies", "clipping",
    "bn-depth", "isometry", "mnist1d-baseline", "recurrent", "normalisation-placement",
]


def test_study_names_are_the_contract() -> None:
    assert STUDY_NAMES == CONTRACT_NAMES
    assert sorted(STUDIES.names()) == sorted(CONTRACT_NAMES)


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_every_study_has_the_same_shape(name: str) -> None:
    mod = get_study(name)
    for attr in ("TITLE", "QUESTION", "CLAIM", "SETUP", "REFERENCES", "SMOKE"):
        assert getattr(mod, attr), f"{name} lacks {attr}"
    for fn in ("get_config", "run", "conclude", "figures"):
        assert callable(getattr(mod, fn))
    quick, full = mod.get_config(True), mod.get_config(False)
    json.dumps(quick)
    json.dumps(full)
    assert set(mod.SMOKE) <= set(quick), f"{name}: SMOKE overrides unknown keys"
    assert quick != full, f"{name}: quick and full configurations are identical"


def test_unknown_study_fails_loudly_with_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown study 'saturaton'.*did you mean 'saturation'"):
        get_study("saturaton")
    with pytest.raises(ValueError, match="valid choices: .*bn-depth"):
        resolve_names(["nope"])
    assert resolve_names(["all"]) == CONTRACT_NAMES
    assert resolve_names(["isometry", "all"])[0] == "isometry"
    assert len(resolve_names(["isometry", "all"])) == len(CONTRACT_NAMES)


def test_conclusion_validates_and_roundtrips() -> None:
    with pytest.raises(ValueError, match="verdict must be one of"):
        B.Conclusion("c", "s", "maybe")
    c = B.conclusion("claim", "sentence", B.CONTRADICTS, {"x": math.nan}, ["d"])
    assert c.sentence.lower().startswith("the measurements contradict")
    d = c.to_dict()
    assert d["numbers"]["x"] == "NaN"
    back = B.Conclusion.from_dict(json.loads(json.dumps(d)))
    assert back.verdict == B.CONTRADICTS and back.details == ["d"]
    assert B.conclusion("c", "fine", B.SUPPORTS).sentence == "fine"


def test_combine_verdicts() -> None:
    assert B.combine_verdicts([B.SUPPORTS, B.SUPPORTS]) == B.SUPPORTS
    assert B.combine_verdicts([B.SUPPORTS, B.INCONCLUSIVE]) == B.INCONCLUSIVE
    assert B.combine_verdicts([B.SUPPORTS, B.CONTRADICTS, B.INCONCLUSIVE]) == B.CONTRADICTS
    assert B.combine_verdicts([]) == B.INCONCLUSIVE


def test_json_keeps_nonfinite_numbers(tmp_path: Path) -> None:
    B.write_json(tmp_path / "a.json", {"a": [math.inf, -math.inf, math.nan, 1.5]})
    a = B.read_json(tmp_path / "a.json")["a"]
    assert a[0] == math.inf and a[1] == -math.inf and math.isnan(a[2]) and a[3] == 1.5
    assert B.config_hash({"a": 1, "b": 2}) == B.config_hash({"b": 2, "a": 1})
    assert B.config_hash({"a": 1}) != B.config_hash({"a": 2})


def test_cached_computes_once_and_ignores_executor(tmp_path: Path) -> None:
    calls = []

    def f() -> dict:
        calls.append(1)
        return {"v": math.nan, "w": 3}

    a = B.cached(tmp_path, {"k": 1, "executor": "local"}, f)
    b = B.cached(tmp_path, {"k": 1, "executor": "ray", "workers": 4}, f)
    assert len(calls) == 1 and math.isnan(a["v"]) and math.isnan(b["v"]) and b["w"] == 3
    B.cached(tmp_path, {"k": 2}, f)
    assert len(calls) == 2
    # a corrupt cache file is recomputed, not trusted
    for p in (tmp_path / "cache").iterdir():
        p.write_text("{not json")
    B.cached(tmp_path, {"k": 2}, f)
    assert len(calls) == 3


def test_run_study_resumes_and_records_failures(tmp_path: Path) -> None:
    small = {"steps": 20, "eval_every": 10}
    o1 = run_study("mnist1d-baseline", tmp_path, quick=True, overrides=small)
    assert o1.status == "done" and o1.conclusion is not None and o1.figures
    o2 = run_study("mnist1d-baseline", tmp_path, quick=True, overrides=small)
    assert o2.status == "cached"
    assert o2.conclusion.sentence == o1.conclusion.sentence
    o3 = run_study("mnist1d-baseline", tmp_path, quick=True, overrides=small, force=True)
    assert o3.status == "done"
    # a changed configuration is not served from the stored results
    o4 = run_study("mnist1d-baseline", tmp_path, quick=True, overrides={**small, "steps": 21})
    assert o4.status == "done"
    with pytest.raises(ValueError, match="unknown config key.*: nope"):
        run_study("mnist1d-baseline", tmp_path, quick=True, overrides={"nope": 1})
    # a study that raises is recorded as failed; the report says so
    bad = run_study("mnist1d-baseline", tmp_path / "bad", quick=True,
                    overrides={**small, "seeds": "not-a-list-of-ints"})
    assert bad.status == "failed" and bad.error
    meta = B.read_json(tmp_path / "bad" / "mnist1d-baseline" / "meta.json")
    assert meta["status"] == "failed" and "Traceback" in meta["traceback"]
    page = build_report(tmp_path / "bad").read_text()
    assert "failed" in page


def test_report_escapes_user_strings(tmp_path: Path) -> None:
    run_study("mnist1d-baseline", tmp_path, quick=True, overrides={"steps": 10, "eval_every": 5})
    d = tmp_path / "mnist1d-baseline"
    cfg = B.read_json(d / "config.json")
    cfg["note"] = "<script>alert('x')</script>"
    B.write_json(d / "config.json", cfg)
    meta = B.read_json(d / "meta.json")
    meta["environment"]["platform"] = "<b onmouseover=alert(2)>linux</b>"
    B.write_json(d / "meta.json", meta)
    # a failed study shows its error message in the index
    bad = tmp_path / "isometry"
    bad.mkdir()
    B.write_json(bad / "meta.json", {"name": "isometry", "status": "failed", "quick": True,
                                   "error": "<img src=x onerror=alert(1)> & done",
                                   "traceback": "Traceback <tb>"})
    page = build_report(tmp_path).read_text()
    assert "<script>" not in page and "<img src=x" not in page and "<b onmouseover" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt; &amp; done" in page
    assert "&lt;b onmouseover=alert(2)&gt;" in page and "Traceback &lt;tb&gt;" in page
    # self-contained: no external resources, every figure embedded as a PNG data URI
    assert not re.search(r"(src|href)=\"(https?:|//)", page)
    imgs = re.findall(r"<img src=\"([^\"]+)\"", page)
    assert imgs and all(s.startswith("data:image/png;base64,") for s in imgs)


def test_report_of_missing_or_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no lab output directory"):
        build_report(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="holds no study results"):
        build_report(tmp_path)


def test_cli_list_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    for n in CONTRACT_NAMES:
        assert n in out
    assert main(["lab", "run", "nosuchstudy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'nosuchstudy'" in err and "valid choices" in err
    assert main(["lab", "run", "mnist1d-baseline", "--executor", "dask"]) == 2
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "no lab output directory" in capsys.readouterr().err


def test_cli_report_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_study("mnist1d-baseline", tmp_path, quick=True, overrides={"steps": 10, "eval_every": 5})
    (tmp_path / "index.html").unlink(missing_ok=True)
    (tmp_path / "mnist1d-baseline" / "conclusion.json").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "index.html").exists()
    # the conclusion is recomputed from the stored measurements, nothing is trained
    assert B.read_json(tmp_path / "mnist1d-baseline" / "conclusion.json")["verdict"]
    assert str(tmp_path / "index.html") in capsys.readouterr().out

