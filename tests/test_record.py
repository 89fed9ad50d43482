"""Record: round trips, tidy table, matrix views."""

import math

import numpy as np
import pytest

from signalprop.record import MODEL, LayerInfo, Record


def _rec() -> Record:
    r = Record(meta={"model": "mlp"})
    r.add_layer(LayerInfo("0", "Linear", depth=0))
    r.add_layer(LayerInfo("1", "Sigmoid", depth=1, activation="sigmoid"))
    r.add_layer(LayerInfo("0.weight", "Parameter", role="param", depth=0, module="0"))
    for s in (0, 5, 10):
        r.add(s, "0", "out_mean", 0.1 * s)
        r.add(s, "1", "saturated_frac", 0.5)
        r.add(s, "0.weight", "grad_norm", 10.0**-s)
        r.add_scalar(s, "loss", 2.3 - 0.1 * s)
    r.add(10, "1", "out_mean", math.nan)
    r.add(10, "0", "out_std", math.inf)
    return r


def test_json_round_trip_keeps_nonfinite(tmp_path):
    r = _rec()
    for name in ("rec.json", "rec.json.gz"):
        p = r.save(tmp_path / name)
        r2 = Record.load(p)
        assert r2.steps == [0, 5, 10]
        assert list(r2.layers) == list(r.layers)
        assert math.isnan(r2.get(10, "1", "out_mean"))
        assert r2.get(10, "0", "out_std") == math.inf
        assert r2.get(5, "0.weight", "grad_norm") == pytest.approx(1e-5)
        assert r2.meta == {"model": "mlp"}


def test_load_rejects_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a signalprop record"):
        Record.load(p)
    with pytest.raises(FileNotFoundError):
        Record.load(tmp_path / "missing.json")


def test_tidy_rows_one_per_step_layer_metric():
    r = _rec()
    df = r.to_dataframe()
    assert list(df.columns[:4]) == ["step", "layer", "metric", "value"]
    assert len(df) == sum(len(d) for row in r.data.values() for d in row.values())
    assert not df.duplicated(["step", "layer", "metric"]).any()
    assert set(df[df.layer == MODEL].metric) == {"loss"}


def test_series_and_matrix():
    r = _rec()
    s, v = r.scalar("loss")
    np.testing.assert_allclose(v, [2.3, 1.8, 1.3])
    steps, layers, m = r.matrix("out_mean")
    assert layers == ["0", "1"]
    assert m.shape == (3, 2)
    assert np.isnan(m[0, 1]) and np.isnan(m[2, 1])
    assert r.layer_names(role="param") == ["0.weight"]
    assert r.has("grad_norm") and not r.has("dead_frac")


def test_values_added_flat_are_read_as_add_many_would_store_them(tmp_path):
    import pickle

    r, ref = Record(), Record()
    r.add(0, "a", "m", 1.0)
    ref.add(0, "a", "m", 1.0)
    r._add_flat(1, [("a", "m"), ("b", "n"), (MODEL, "loss")], [2.0, math.inf, 0.5])
    r._add_flat(0, [("a", "k")], [3.0])  # (a step already stored: merged, order kept)
    ref.add_many(1, {"a": {"m": 2.0}, "b": {"n": math.inf}, MODEL: {"loss": 0.5}})
    ref.add_many(0, {"a": {"k": 3.0}})
    assert r.__dict__["_flat"]  # nothing built before a read
    copy = pickle.loads(pickle.dumps(r))  # (values waiting travel with a pickle)
    for rec in (r, copy, Record.load(r.save(tmp_path / "r.json.gz"))):
        assert rec.steps == [0, 1]
        assert [list(d.items()) for d in rec.data[1].values()] == \
            [list(d.items()) for d in ref.data[1].values()]
        assert list(rec.data[0]["a"]) == ["m", "k"]
        assert rec.get(1, MODEL, "loss") == 0.5 and rec.get(1, "b", "n") == math.inf
    assert r == copy
    r.data = {}  # (assigning data drops what waited)
    r._add_flat(4, [("c", "x")], [1.0])
    assert r.data == {4: {"c": {"x": 1.0}}} and Record(data={4: {"c": {"x": 1.0}}}) == r
