"""TensorBoard export: events written by signalprop, read back with TensorBoard's own reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from signalprop.integrations.tensorboard import (  # noqa: E402
    TensorBoardWriter,
    load_scalars,
    percentile_histogram,
    scalar_tag,
    write_record,
)
from signalprop.probe import Probe  # noqa: E402
from signalprop.record import MODEL, LayerInfo, Record  # noqa: E402

PCTS = {"out_p05": -2.0, "out_p15": -1.0, "out_p50": 0.0, "out_p85": 1.0, "out_p95": 2.0}


def _hand_record() -> Record:
    rec = Record(meta={"model": "Hand"})
    for n, t in (("l0", "Linear"), ("a0", "Tanh"), ("l1", "Linear")):
        rec.add_layer(LayerInfo(n, t))
    rec.add_layer(LayerInfo("l0.weight", "Parameter", role="param", module="l0", shape=[4, 4]))
    rec.add_layer(LayerInfo("l1.weight", "Parameter", role="param", module="l1", shape=[2, 4]))
    for s in (0, 5, 10):
        rec.add_many(
            s,
            {
                "a0": {**PCTS, "out_std": 0.5 + s, "saturated_frac": 0.25},
                "l0.weight": {"grad_norm": 10.0 ** (-s)},
                "l1.weight": {"grad_norm": 2.0 + s},
                MODEL: {"loss": 1.0 / (1 + s)},
            },
        )
    # step 5: a NaN, an Inf and an exactly-zero gradient norm
    rec.add(5, "a0", "out_std", math.nan)
    rec.add(5, "l1.weight", "grad_norm", math.inf)
    rec.add(10, "l0.weight", "grad_norm", 0.0)
    return rec


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    rec = _hand_record()
    logdir = tmp_path_factory.mktemp("tb") / "run"
    out = rec.to_tensorboard(logdir)  # the Record method delegates to write_record
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return rec, out, acc


def test_scalars_round_trip_through_tensorboard_reader(written) -> None:
    rec, out, acc = written
    assert out.exists()
    scalars = load_scalars(out)
    for step, layer, metric, value in rec.rows():
        tag = scalar_tag(metric, layer)
        steps, vals = scalars[tag]
        i = list(steps).index(step)
        if math.isnan(value):
            assert math.isnan(vals[i]), tag
        else:
            # TensorBoard stores simple_value as float32
            assert vals[i] == pytest.approx(value, rel=1e-6, abs=1e-30), tag
    # whole-model scalars drop the layer component; the step keys are the record's
    assert list(scalars["signalprop/loss"][0]) == [0, 5, 10]
    assert "signalprop/grad_norm/l0.weight" in acc.Tags()["scalars"]


def test_nonfinite_values_are_counted_not_dropped(written) -> None:
    _, out, _ = written
    sc = load_scalars(out)
    steps, n = sc["signalprop/nonfinite_layers/out_std"]
    assert dict(zip(steps.tolist(), n.tolist(), strict=True)) == {0: 0.0, 5: 1.0, 10: 0.0}
    steps, n = sc["signalprop/nonfinite_layers/grad_norm"]
    assert dict(zip(steps.tolist(), n.tolist(), strict=True)) == {0: 0.0, 5: 1.0, 10: 0.0}
    assert math.isinf(sc["signalprop/grad_norm/l1.weight"][1][1])


def test_depth_histogram_of_log10_grad_norms(written) -> None:
    rec, _, acc = written
    hists = {e.step: e.histogram_value for e in acc.Histograms("signalprop/depth/log10_grad_norm")}
    excluded = load_scalars(acc.path)["signalprop/depth_excluded/log10_grad_norm"]
    assert dict(zip(*[a.tolist() for a in excluded], strict=True)) == {0: 0.0, 5: 1.0, 10: 1.0}
    # step 0: log10 of (1, 2) -> min 0, max log10 2; step 5: only 1e-5 is finite
    assert hists[0].num == 2
    assert hists[0].min == pytest.approx(0.0, abs=1e-7)
    assert hists[0].max == pytest.approx(math.log10(2.0), rel=1e-6)
    assert hists[5].num == 1 and hists[5].min == pytest.approx(-5.0, rel=1e-6)
    assert hists[10].num == 1 and hists[10].min == pytest.approx(math.log10(12.0), rel=1e-6)


def test_percentile_histogram_in_event_file(written) -> None:
    _, _, acc = written
    h = acc.Histograms("signalprop/out_dist/a0")[0].histogram_value
    assert list(h.bucket_limit) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert list(h.bucket) == [0.0, 10.0, 35.0, 35.0, 10.0]
    assert (h.min, h.max, h.num) == (-2.0, 2.0, 90.0)
    # sum from bucket mid-points: 10*-1.5 + 35*-0.5 + 35*0.5 + 10*1.5 = 0
    assert h.sum == pytest.approx(0.0, abs=1e-12)


def test_metric_filter_and_options(tmp_path) -> None:
    rec = _hand_record()
    write_record(rec, tmp_path, metrics=["grad_norm"], histograms=False, prefix="sp")
    sc = load_scalars(tmp_path)
    assert set(sc) == {
        "sp/grad_norm/l0.weight",
        "sp/grad_norm/l1.weight",
        "sp/nonfinite_layers/grad_norm",
    }
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    assert acc.Tags()["histograms"] == []


def test_live_writer_as_probe_listener_matches_record(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with TensorBoardWriter(tmp_path) as tb:
        probe = Probe(model, optimizer=opt, schedule=2, on_record=[tb])
        with probe:
            for _ in range(5):
                x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                probe.log(loss=loss)
                opt.step()
        assert tb.steps_written == 3
    rec = probe.record
    assert rec.steps == [0, 2, 4]
    sc = load_scalars(tmp_path)
    n = 0
    for step, layer, metric, value in rec.rows():
        steps, vals = sc[scalar_tag(metric, layer)]
        assert vals[list(steps).index(step)] == pytest.approx(value, rel=1e-6, abs=1e-30)
        n += 1
    assert n > 50
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    assert "signalprop/out_dist/1" in acc.Tags()["histograms"]  # the Tanh
    assert "signalprop/depth/log10_out_grad_norm" in acc.Tags()["histograms"]


def test_percentile_histogram_merges_ties_and_needs_two_points() -> None:
    dead = {"out_p05": 0.0, "out_p15": 0.0, "out_p50": 0.0, "out_p85": 0.5, "out_p95": 1.0}
    lo, hi, limits, counts = percentile_histogram(dead)
    assert (lo, hi) == (0.0, 1.0)
    assert limits == [0.0, 0.5, 1.0] and counts == [45.0, 35.0, 10.0]
    assert percentile_histogram({"out_p50": 1.0, "out_std": 2.0}) is None
    assert percentile_histogram({"out_p05": math.nan, "out_p50": 1.0}) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=2, max_size=5
    )
)
def test_percentile_histogram_properties(vals: list[float]) -> None:
    qs = [5, 15, 50, 85, 95][: len(vals)]
    metrics = {f"out_p{q:02d}": v for q, v in zip(qs, sorted(vals), strict=True)}
    lo, hi, limits, counts = percentile_histogram(metrics)
    assert lo == min(vals) and hi == max(vals) == limits[-1]
    assert all(b > a for a, b in zip(limits, limits[1:], strict=False))  # strictly increasing
    assert sum(counts) == pytest.approx(qs[-1] - qs[0])
    assert len(limits) == len(counts)


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="Record"):
        write_record({"not": "a record"}, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of metric names"):
        TensorBoardWriter("x", metrics="grad_norm")
    with pytest.raises(ValueError, match="logdir"):
        TensorBoardWriter()
    with pytest.raises(FileNotFoundError):
        load_scalars("/nonexistent/signalprop-tb")
    np.testing.assert_equal(scalar_tag("loss", MODEL), "signalprop/loss")
