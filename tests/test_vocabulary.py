"""The small things written once (issue 11): JSON encoder and NaN policy, number formatter,
"auto" device resolver, progress bar."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from signalprop._device import resolve_device
from signalprop._format import fmt_number
from signalprop._progress import ProgressBar
from signalprop.diagnosis.context import fmt as evidence_fmt
from signalprop.diagnosis.report import _jsonable
from signalprop.lab.base import fmt as lab_fmt
from signalprop.record import NONFINITE, from_jsonable, json_number, to_jsonable
from signalprop.report.html import fmt_number as table_fmt


def test_one_nan_policy_round_trips_and_stays_valid_json() -> None:
    obj = {"a": [math.nan, math.inf, -math.inf, 1.5, 2], "b": np.float32(0.5), 3: None,
           "t": torch.tensor([1.0, math.nan]), "n": np.array([math.inf])}
    enc = to_jsonable(obj)
    text = json.dumps(enc, allow_nan=False)  # valid JSON: no bare NaN
    assert enc["a"] == ["NaN", "Infinity", "-Infinity", 1.5, 2] and enc["3"] is None
    assert enc["t"] == [1.0, "NaN"] and enc["n"] == ["Infinity"] and enc["b"] == 0.5
    back = from_jsonable(json.loads(text))
    assert math.isnan(back["a"][0]) and back["a"][1:3] == [math.inf, -math.inf]
    assert set(NONFINITE) == {"NaN", "Infinity", "-Infinity"}
    assert json_number(True) is True and json_number(np.float64(math.nan)) == "NaN"


def test_encoder_strictness() -> None:
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"x": object()})
    # the report's metadata is free-form: to_dict() through, anything else as text
    assert _jsonable({"x": object.__new__(type("Opaque", (), {"__str__": lambda s: "o"}))}) == {
        "x": "o"}
    assert _jsonable([math.nan]) == ["NaN"]  # the report spells NaN like the record does


@pytest.mark.parametrize("v, table, sentence, evidence", [
    (0.123456, "0.123", "0.123", "0.12"),
    (123456.0, "1.23e+05", "1.23e+05", "1.2e5"),
    (3e-7, "3.00e-07", "3.00e-07", "3.0e-7"),
    (0.0, "0", "0", "0"),
    (math.nan, "–", "n/a", "NaN"),
    (None, "–", "n/a", "NaN"),
    (math.inf, "∞", "inf", "inf"),
    (-math.inf, "-∞", "-inf", "-inf"),
    (12, "12", "12", "12"),
    (123456, "123456", "1.23e+05", "1.2e5"),
])
def test_one_formatter_keeps_each_callers_spelling(v, table, sentence, evidence) -> None:
    # expected strings are what the three separate copies printed before they shared fmt_number
    assert table_fmt(v) == table
    assert lab_fmt(v) == sentence
    assert evidence_fmt(v) == evidence
    assert fmt_number(v) == sentence


def test_auto_device_and_clear_errors() -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="invalid device 'tpu9'.*valid: auto, cpu"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_disabled_progress_bar_does_nothing() -> None:
    bar = ProgressBar({"steps": 10}, enabled=False)
    bar.advance("steps", 3)
    bar(2, 0.5)
    bar.close()
    with ProgressBar({}) as empty:  # no task: nothing to draw
        empty(0, 1.0)


def test_sweep_run_outcome_is_typed() -> None:
    from signalprop.sweep import RunOutcome

    f = RunOutcome.failed("r1", "ValueError: boom", {"device": "cpu"})
    assert (f.status, f.metrics, f.record, f.wall_time, f.error) == (
        "failed", {}, None, None, "ValueError: boom")
    with pytest.raises(ValueError, match="done, diverged or failed.*'pending'"):
        RunOutcome("r2", "pending")
