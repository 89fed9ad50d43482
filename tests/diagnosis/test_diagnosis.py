"""Diagnosis rules on hand-built records whose answers are known in closed form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalprop.diagnosis import (
    KINDS,
    REMEDY_NAMES,
    Finding,
    Prescription,
    Thresholds,
    context_of,
    diagnose,
    merge_prescriptions,
)
from signalprop.diagnosis.context import fmt
from signalprop.record import LayerInfo, Record


def make_record(
    depth: int = 6,
    width: int = 32,
    activation: str = "relu",
    steps: int = 10,
    grad_factor: float = 1.0,
    bn: bool = False,
    sat: float | list[float] | None = None,
    dead: float | list[float] | None = None,
    update: float = 1e-3,
    loss: list[float] | None = None,
    sigma_w2: float = 2.0,
) -> Record:
    """A record of an MLP ``Linear, [BN], act, ..., Linear`` with exact synthetic values.

    ||dL/dh|| at weight layer j (0-based, L layers) is ``grad_factor ** (L - 1 - j)``: every
    layer multiplies the backward signal by ``grad_factor``, so the first/last ratio is
    ``grad_factor ** (L - 1)`` exactly.
    """
    rec = Record()
    d = 0
    lin, acts = [], []
    for i in range(depth):
        name = f"lin{i}"
        rec.add_layer(LayerInfo(name, "Linear", depth=d))
        lin.append(name)
        d += 1
        if i < depth - 1:
            if bn:
                rec.add_layer(LayerInfo(f"bn{i}", "BatchNorm1d", depth=d))
                d += 1
            rec.add_layer(LayerInfo(f"act{i}", activation.capitalize(), depth=d,
                                    activation=activation))
            acts.append(f"act{i}")
            d += 1
    for name in lin:
        info = rec.layers[name]
        rec.add_layer(LayerInfo(f"{name}.weight", "Parameter", "param", info.depth, None, name,
                                [width, width]))
        rec.add_layer(LayerInfo(f"{name}.bias", "Parameter", "param", info.depth, None, name,
                                [width]))
    sats = sat if isinstance(sat, list) else [sat] * steps
    deads = dead if isinstance(dead, list) else [dead] * steps
    for s in range(steps):
        for j, name in enumerate(lin):
            g = grad_factor ** (depth - 1 - j)
            rec.add(s, name, "out_grad_norm", g)
            rec.add(s, name, "out_mean", 0.0)
            rec.add(s, name, "out_std", 1.0)
            rec.add(s, f"{name}.weight", "grad_norm", g)
            rec.add(s, f"{name}.weight", "weight_norm", math.sqrt(sigma_w2 * width))
            rec.add(s, f"{name}.weight", "update_ratio", update)
            rec.add(s, f"{name}.bias", "grad_norm", g)
        for a in acts:
            if sats[s] is not None:
                rec.add(s, a, "saturated_frac", sats[s])
            if deads[s] is not None:
                rec.add(s, a, "dead_frac", deads[s])
        rec.add_scalar(s, "loss", loss[s] if loss else 2.3 - 0.1 * s)
    return rec


def kinds(findings: list[Finding]) -> list[str]:
    return [f.kind for f in findings]


def test_healthy_record_is_clean() -> None:
    assert diagnose(make_record()) == []


def test_vanishing_ratio_and_factor_match_closed_form() -> None:
    rec = make_record(depth=8, grad_factor=0.25)
    (f,) = diagnose(rec)
    assert f.kind == "vanishing_gradients"
    assert f.numbers["ratio"] == pytest.approx(0.25**7, rel=1e-9)
    assert f.numbers["per_layer_factor"] == pytest.approx(0.25, rel=1e-9)
    # layer j has 0.25^(7-j) of the last layer's gradient: below 1e-2 up to j = 3
    # (0.25^4 = 0.0039), not from j = 4 (0.25^3 = 0.0156)
    assert f.layers == [f"lin{i}" for i in range(4)]
    assert "6.1e-5x" in f.evidence and "Layers 1-4" in f.evidence
    assert f.severity == "warning"  # 6.1e-5 is above the critical 1e-6
    assert all(isinstance(p, Prescription) for p in f.prescriptions)


def test_exploding_ratio_and_severity() -> None:
    rec = make_record(depth=12, grad_factor=4.0)
    (f,) = diagnose(rec)
    assert f.kind == "exploding_gradients"
    assert f.numbers["ratio"] == pytest.approx(4.0**11, rel=1e-9)
    assert f.severity == "critical"  # 4^11 = 4.2e6 > 1e6
    assert f.remedies[0] in {"clip_norm", "kaiming_init", "residual"}


def test_ratio_at_threshold_boundary() -> None:
    # 0.5^6 = 0.0156 > 1e-2: not vanishing; 0.5^7 = 0.0078 < 1e-2: vanishing
    assert diagnose(make_record(depth=7, grad_factor=0.5)) == []
    assert kinds(diagnose(make_record(depth=8, grad_factor=0.5))) == ["vanishing_gradients"]


@settings(max_examples=40, deadline=None)
@given(factor=st.floats(0.3, 3.0), depth=st.integers(2, 12))
def test_gradient_findings_follow_the_threshold(factor: float, depth: int) -> None:
    ratio = factor ** (depth - 1)
    th = Thresholds()
    if abs(math.log10(ratio) - math.log10(th.vanishing_ratio)) < 1e-6 or abs(
        math.log10(ratio) - math.log10(th.exploding_ratio)
    ) < 1e-6:
        return  # exactly on the boundary: either answer is fine
    got = kinds(diagnose(make_record(depth=depth, grad_factor=factor), th))
    grad = [k for k in got if k.endswith("_gradients")]
    if ratio < th.vanishing_ratio:
        assert grad == ["vanishing_gradients"]
    elif ratio > th.exploding_ratio:
        assert grad == ["exploding_gradients"]
    else:
        assert grad == []


def test_zero_gradient_layers_are_reported() -> None:
    rec = make_record(depth=5)
    for s in rec.steps:
        rec.add(s, "lin0", "out_grad_norm", 0.0)
        rec.add(s, "lin0.weight", "grad_norm", 0.0)
    (f,) = diagnose(rec)
    assert f.kind == "vanishing_gradients"
    assert f.numbers["ratio"] == 0.0
    assert f.numbers["zero_gradient_layers"] == 1
    assert "exactly 0" in f.evidence
    # no optimiser can move a weight with zero gradient: they are not ranked first
    assert f.remedies[0] not in {"adam", "rprop", "rmsprop", "smorms3"}


def test_weight_gradients_used_when_output_gradients_missing() -> None:
    rec = make_record(depth=6, grad_factor=0.1)
    for row in rec.data.values():
        for d in row.values():
            d.pop("out_grad_norm", None)
    (f,) = diagnose(rec)
    assert f.kind == "vanishing_gradients"
    assert f.numbers["ratio"] == pytest.approx(1e-5, rel=1e-9)
    assert "||dL/dW||" in f.evidence


def test_growth_over_training_is_exploding() -> None:
    rec = make_record(depth=3)
    for s in rec.steps:
        rec.add_scalar(s, "grad_norm_total", 10.0**s)
    (f,) = diagnose(rec)
    assert f.kind == "exploding_gradients"
    assert f.numbers["growth"] == pytest.approx(1e9)


def test_saturation_fraction_is_the_tail_median() -> None:
    sat = [0.0, 0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
    rec = make_record(activation="sigmoid", sat=sat, depth=4)
    (f,) = diagnose(rec)
    assert f.kind == "saturation"
    assert f.numbers["mean_fraction"] == pytest.approx(np.median(sat[5:]), abs=1e-12)
    assert f.numbers["initial_fraction"] == 0.0
    assert f.layers == ["act0", "act1", "act2"]
    assert "70% of units in layers 1-3" in f.evidence
    assert f.severity == "warning"
    # saturation that grew during training points at the step size
    assert "lower_lr" in f.remedies[:3]


def test_saturation_from_init_ranks_init_and_norm_first() -> None:
    rec = make_record(activation="tanh", sat=0.9, depth=4)
    (f,) = diagnose(rec)
    assert f.severity == "critical"
    assert f.remedies[0] == "batchnorm"
    assert {"xavier_init", "lsuv_init"} & set(f.remedies[:3])
    # with batch norm already present, it is not prescribed again
    (g,) = diagnose(make_record(activation="tanh", sat=0.9, depth=4, bn=True))
    assert "batchnorm" not in g.remedies


def test_saturation_below_threshold_is_clean() -> None:
    assert diagnose(make_record(activation="tanh", sat=0.07, bn=True)) == []


def test_dead_units() -> None:
    rec = make_record(dead=0.85, depth=4)
    (f,) = diagnose(rec)
    assert f.kind == "dead_units" and f.severity == "critical"
    assert f.numbers["mean_fraction"] == pytest.approx(0.85)
    assert f.remedies[0] == "kaiming_init"  # dead from the start: an init problem
    died = make_record(dead=[0.0] * 3 + [0.6] * 7, depth=4)
    (g,) = diagnose(died)
    assert g.remedies[0] == "lower_lr"  # died during training: the step size


def test_nonfinite_found_and_located() -> None:
    rec = make_record(depth=4)
    rec.add(7, "act1", "out_nonfinite", 12.0)
    rec.add(7, "lin2", "out_nonfinite", 32.0)
    rec.add(7, "lin2", "out_mean", math.nan)
    rec.add_scalar(7, "loss", math.nan)
    fs = diagnose(rec)
    assert kinds(fs)[0] == "nonfinite"
    f = fs[0]
    assert f.severity == "critical"
    assert f.numbers["first_step"] == 7
    assert f.layers[0] == "act1"  # forward order: act1 precedes lin2
    assert "step 7" in f.evidence
    assert f.remedies[0] == "lower_lr"


def test_nonfinite_from_data_has_no_training_remedy() -> None:
    rec = make_record(depth=3)
    rec.meta["data_nonfinite"] = 5
    rec.add(0, "lin0", "out_nonfinite", 5.0)
    rec.add_scalar(0, "loss", math.nan)
    (f, *_) = diagnose(rec)
    assert f.kind == "nonfinite"
    assert f.prescriptions == []
    assert "5 NaN/Inf" in f.evidence


def test_nonfinite_from_meta_only() -> None:
    # a schedule that skipped the diverging step still leaves train()'s diverged_step in meta
    rec = make_record(depth=3)
    rec.meta["diverged_step"] = 42
    (f,) = diagnose(rec)
    assert f.kind == "nonfinite" and f.numbers["first_step"] == 42


def test_divergence_of_a_finite_loss() -> None:
    loss = [2.0, 2.1, 2.0, 5, 10, 30, 60, 80, 90, 100]
    (f,) = diagnose(make_record(depth=3, loss=loss))
    assert f.kind == "divergence"
    assert f.numbers["loss_ratio"] == pytest.approx(90 / 2.0)
    assert f.remedies[0] == "lower_lr"


def test_update_ratio_high_and_low() -> None:
    (f,) = diagnose(make_record(depth=3, update=0.5))
    assert f.kind == "update_ratio" and f.severity == "warning"
    assert f.numbers["n_high"] == 3 and f.remedies[0] == "lower_lr"
    (g,) = diagnose(make_record(depth=3, update=1e-8))
    assert g.severity == "info" and g.numbers["n_low"] == 3
    # layers whose slowness the vanishing finding already explains are not repeated
    fs = diagnose(make_record(depth=8, grad_factor=0.1, update=1e-8))
    upd = [f for f in fs if f.kind == "update_ratio"]
    van = fs[0]
    assert van.kind == "vanishing_gradients"
    assert all(n not in van.layers for f in upd for n in f.layers)


def test_findings_sorted_by_severity() -> None:
    rec = make_record(depth=8, grad_factor=0.1, activation="sigmoid", sat=0.5)
    fs = diagnose(rec)
    sev = [f.severity for f in fs]
    order = {"critical": 0, "warning": 1, "info": 2}
    assert sev == sorted(sev, key=order.get)
    assert set(kinds(fs)) == {"vanishing_gradients", "saturation"}


def test_every_prescription_names_a_known_remedy_with_a_reason() -> None:
    recs = [
        make_record(depth=8, grad_factor=0.1, activation="sigmoid", sat=0.6, sigma_w2=0.33),
        make_record(depth=8, grad_factor=0.1, activation="tanh"),
        make_record(depth=8, grad_factor=10.0, bn=True),
        make_record(depth=4, dead=0.9, update=0.5),
        make_record(depth=4, loss=[1, 1, 1, 50, 50, 50, 50, 50, 50, 50]),
    ]
    for rec in recs:
        for f in diagnose(rec):
            assert f.kind in KINDS
            ranks = [p.rank for p in f.prescriptions]
            assert ranks == list(range(1, len(ranks) + 1))
            assert len(set(f.remedies)) == len(f.remedies)
            for p in f.prescriptions:
                assert p.remedy in REMEDY_NAMES and len(p.reason) >= 15


def test_ranking_depends_on_context() -> None:
    # sigmoid: relu alone cannot fix a small weight scale, so it drops below its He-init peers
    small = diagnose(make_record(depth=10, grad_factor=0.1, activation="sigmoid", sigma_w2=0.33))
    large = diagnose(make_record(depth=10, grad_factor=0.1, activation="sigmoid", sigma_w2=2.0))
    assert small[0].remedies.index("relu") > large[0].remedies.index("relu")
    assert "sigma_w^2 = 0.33" in small[0].prescriptions[small[0].remedies.index("relu")].reason
    # tanh: the edge of chaos / dynamical isometry come first after batch norm
    tanh = diagnose(make_record(depth=10, grad_factor=0.1, activation="tanh"))[0]
    assert set(tanh.remedies[:4]) >= {"critical_init", "orthogonal_init"}
    # relu with weights below He scale: He init first; already at He scale: not first
    relu = diagnose(make_record(depth=10, grad_factor=0.1, activation="relu", sigma_w2=0.5))[0]
    assert relu.remedies[0] == "kaiming_init"
    assert "sigma_w^2 = 0.5" in relu.prescriptions[0].reason
    he = diagnose(make_record(depth=10, grad_factor=0.1, activation="relu", sigma_w2=2.0))[0]
    assert he.remedies[0] != "kaiming_init"
    # BN present: not prescribed; deep BN nets that explode get skips
    bn = diagnose(make_record(depth=10, grad_factor=3.0, bn=True))[0]
    assert bn.kind == "exploding_gradients" and bn.remedies[0] == "residual"
    # tiny but non-zero gradients: Adam's eps regime -> Rprop before Adam
    tiny = make_record(depth=10, grad_factor=0.01)
    van = diagnose(tiny)[0]
    assert van.remedies.index("rprop") < van.remedies.index("adam")


def test_thresholds_override_and_validation() -> None:
    rec = make_record(depth=8, grad_factor=0.5)  # ratio 0.0078
    assert kinds(diagnose(rec)) == ["vanishing_gradients"]
    assert diagnose(rec, {"vanishing_ratio": 1e-3}) == []
    assert diagnose(rec, Thresholds(vanishing_ratio=1e-3)) == []
    with pytest.raises(ValueError, match="vanishing_ratoi.*did you mean 'vanishing_ratio'"):
        diagnose(rec, {"vanishing_ratoi": 1e-3})
    with pytest.raises(ValueError, match="positive"):
        Thresholds(saturated_fraction=-1)
    with pytest.raises(TypeError):
        diagnose(rec, 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Record"):
        diagnose({"not": "a record"})  # type: ignore[arg-type]


def test_missing_metrics_skip_rules_quietly() -> None:
    rec = Record()
    rec.add_scalar(0, "loss", 1.0)
    assert diagnose(rec) == []
    assert diagnose(Record()) == []


def test_context_reads_layers() -> None:
    rec = make_record(depth=4, activation="tanh", bn=True, sigma_w2=1.7)
    ctx = context_of(rec)
    assert ctx.weight_layers == ["lin0", "lin1", "lin2", "lin3"]
    assert ctx.has_bn and ctx.saturating == {"tanh"} and ctx.depth == 4
    assert ctx.block["act0"] == 1 and ctx.block["act2"] == 3 and ctx.block["lin3.bias"] == 4
    assert ctx.sigma_w2 == pytest.approx(1.7)
    assert ctx.label(["lin0", "act0", "lin1", "lin3"]) == "layers 1-2, 4"
    assert ctx.label(["act2"]) == "layer 3"


def test_finding_json_round_trip_and_nonfinite_numbers() -> None:
    f = Finding("saturation", ["a"], "text", "warning",
                [Prescription(1, "batchnorm", "because")], {"x": math.nan, "y": 2.0, "n": 3})
    d = f.to_dict()
    assert d["numbers"] == {"x": "NaN", "y": 2.0, "n": 3}  # signalprop.record's NaN policy
    json.dumps(d, allow_nan=False)
    g = Finding.from_dict(d)
    assert math.isnan(g.numbers["x"]) and g.remedies == ["batchnorm"]
    with pytest.raises(ValueError, match="valid choices"):
        Prescription(1, "magic", "no")
    with pytest.raises(ValueError, match="valid choices"):
        Finding("bad_kind", [], "", "warning")


def test_merge_prescriptions_weighs_severity_and_rank() -> None:
    a = Finding("vanishing_gradients", [], "", "critical",
                [Prescription(1, "batchnorm", "a1"), Prescription(2, "adam", "a2")])
    b = Finding("saturation", [], "", "warning",
                [Prescription(1, "adam", "b1"), Prescription(2, "relu", "b2")])
    merged = merge_prescriptions([a, b])
    # scores: batchnorm 9/1 = 9, adam 9/2 + 3/1 = 7.5, relu 3/2 = 1.5
    assert [p.remedy for p in merged] == ["batchnorm", "adam", "relu"]
    assert merged[1].reason == "[vanishing_gradients] a2"  # 4.5 (critical, rank 2) > 3
    assert [p.rank for p in merged] == [1, 2, 3]


def test_fmt() -> None:
    assert fmt(3e-7) == "3.0e-7"
    assert fmt(0.134) == "0.13"
    assert fmt(0.0) == "0"
    assert fmt(math.inf) == "inf"
    assert fmt(570.0) == "5.7e+02"
