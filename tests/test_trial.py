"""Remedy trials on the deep-sigmoid example: a remedy that helps, one that diverges."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from signalprop.data import load_dataset
from signalprop.record import LayerInfo, Record
from signalprop.remedies import Remedy, get_remedy
from signalprop.trial import TrialTable, summarise_record, trial, verdict


def deep_sigmoid(depth: int = 30, width: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.Sigmoid()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)  # default PyTorch init


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def sigmoid_table(digits) -> TrialTable:
    # ReLU + He init at SGD lr 5 blows up within a few steps: a deliberately diverging config
    boom = Remedy("relu_lr5", transform=get_remedy("relu+kaiming_init").transform, lr=5.0)
    return trial(deep_sigmoid, digits, nn.functional.cross_entropy,
                 remedies=["batchnorm", "residual", boom], steps=100, seeds=2,
                 optimizer="sgd", lr=0.1)


def test_a_remedy_improves_the_deep_sigmoid_net(sigmoid_table: TrialTable) -> None:
    base = sigmoid_table.baseline
    assert base is not None and base.verdict == "baseline" and base.diverged == 0
    # the untreated 30-layer sigmoid net barely moves from log(10) in 100 steps ...
    assert base.loss_mean > 2.2
    # ... because its first-layer gradient is orders of magnitude below the last one's
    assert base.grad_ratio < 1e-3
    better = sigmoid_table.improved()
    assert better, str(sigmoid_table)
    best = sigmoid_table.best()
    assert best is not None and best.loss_mean < 0.8 * base.loss_mean
    assert best.delta_loss < 0 and best.rel_change < -0.2
    for r in better:
        assert r.loss_mean < base.loss_mean
        assert r.grad_ratio > base.grad_ratio  # the cure reaches the first layer


def test_divergence_is_recorded_not_raised(sigmoid_table: TrialTable) -> None:
    r = sigmoid_table["relu_lr5"]
    assert r.diverged == r.seeds == 2 and r.diverged_frac == 1.0
    assert r.verdict == "diverged"
    assert math.isnan(r.loss_mean)
    for run in r.runs:
        assert run.diverged and run.diverged_step is not None
        # the one divergence policy (signalprop.train.divergence_reason): non-finite, or above
        # 100 x max(first loss, 1)
        last = run.losses[-1]
        assert not math.isfinite(last) or last > 100 * max(run.losses[0], 1.0)


def test_table_outputs(sigmoid_table: TrialTable) -> None:
    text = str(sigmoid_table)
    for name in ("baseline", "batchnorm", "residual", "relu_lr5", "diverged", "2/2"):
        assert name in text
    d = sigmoid_table.to_dict(runs=True)
    json.dumps(d, allow_nan=False)  # NaN became "NaN" (signalprop.record's policy)
    assert [r["remedy"] for r in d["rows"]] == ["baseline", "batchnorm", "residual", "relu_lr5"]
    assert len(d["rows"][1]["runs"]) == 2 and d["meta"]["steps"] == 100
    df = sigmoid_table.to_dataframe()
    assert {"remedy", "loss_mean", "loss_std", "grad_ratio", "saturated_frac", "dead_frac",
            "diverged", "wall_time", "delta_loss", "verdict"} <= set(df.columns)
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(sigmoid_table)
    assert "relu_lr5" in console.export_text()


def test_inapplicable_remedy_is_an_error_row(digits) -> None:
    def funnel() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    t = trial(funnel, digits, nn.functional.cross_entropy, remedies=["residual", "adam"],
              steps=5, seeds=1, probe=False)
    assert t["residual"].verdict == "not applicable"
    assert "equal input and output widths" in t["residual"].error
    assert t["adam"].error is None and t["adam"].seeds == 1
    assert "residual: not applicable: ValueError" in str(t)
    with pytest.raises(ValueError, match="equal input and output widths"):
        trial(funnel, digits, nn.functional.cross_entropy, remedies=["residual"], steps=2,
              seeds=1, strict=True)


def test_bad_arguments_fail_before_training(digits) -> None:
    with pytest.raises(ValueError, match="did you mean 'batchnorm'"):
        trial(deep_sigmoid, digits, nn.functional.cross_entropy, remedies=["batchnrom"])
    with pytest.raises(ValueError, match="steps"):
        trial(deep_sigmoid, digits, nn.functional.cross_entropy, steps=0)
    with pytest.raises(TypeError, match="instance"):
        m = deep_sigmoid(2)
        trial(m, digits, nn.functional.cross_entropy,
              optimizer=torch.optim.SGD(m.parameters(), lr=0.1))


def test_model_instance_every_run_starts_from_its_weights(digits) -> None:
    torch.manual_seed(3)
    m = deep_sigmoid(depth=2, width=16)
    w = m[0].weight.detach().clone()
    t = trial(m, (digits.x_train[:256], digits.y_train[:256]), nn.functional.cross_entropy,
              remedies=["lower_lr"], steps=3, seeds=2, probe=False)
    torch.testing.assert_close(m[0].weight.detach(), w)  # the user's model is untouched
    base = t.baseline
    assert base is not None
    # same weights, data order seeded per run: identical first losses for both rows
    assert base.runs[0].init_loss == t["lower_lr"].runs[0].init_loss


def test_verdict_rules() -> None:
    assert verdict([2.0, 2.0], [1.0, 1.1]) == "better"
    assert verdict([1.0, 1.0], [1.5, 1.4]) == "worse"
    assert verdict([1.0, 1.0], [0.99, 1.005]) == "no change"  # inside 2%
    # a big but noisy paired difference is not "better"
    assert verdict([1.0, 1.0, 1.0], [0.1, 1.9, 0.4]) == "no change"
    assert verdict([1.0], [float("nan")]) == "no change"


def test_summarise_record_orders_layers_by_depth() -> None:
    rec = Record()
    # declared out of forward order on purpose
    rec.add_layer(LayerInfo("2.weight", "Parameter", role="param", depth=2, shape=[3, 4]))
    rec.add_layer(LayerInfo("0.weight", "Parameter", role="param", depth=0, shape=[4, 4]))
    rec.add_layer(LayerInfo("0.bias", "Parameter", role="param", depth=0, shape=[4]))
    rec.add_layer(LayerInfo("1", "Sigmoid", depth=1, activation="sigmoid"))
    rec.add(0, "0.weight", "grad_norm", 1.0)
    rec.add(0, "2.weight", "grad_norm", 4.0)
    rec.add(5, "0.weight", "grad_norm", 0.0)
    rec.add(5, "0.bias", "grad_norm", 9.0)
    rec.add(5, "2.weight", "grad_norm", 2.0)
    rec.add(5, "1", "saturated_frac", 0.25)
    s = summarise_record(rec)
    assert s["grad_ratio"] == 0.0  # last step, first weight / last weight, bias ignored
    assert s["saturated_frac"] == 0.25 and math.isnan(s["dead_frac"])


def test_signalprop_trial_is_callable_in_any_import_order(digits) -> None:
    import signalprop
    import signalprop.trial  # binds the module to the package attribute

    t = signalprop.trial(deep_sigmoid(depth=2, width=8), (digits.x_train[:64], digits.y_train[:64]),
                         nn.functional.cross_entropy, remedies=["adam"], steps=2, seeds=1,
                         probe=False)
    assert isinstance(t, TrialTable) and len(t) == 2
