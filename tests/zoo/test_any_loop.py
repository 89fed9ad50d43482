"""Zoo: one loop (``signalprop.train.fit``) for any model and batch form, the trivial baseline,
``not_learning``, divergence and Ctrl-C as outcomes. Each truth is computed in the test, by hand
on the first batch or from the labels themselves."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signalprop.doctor import doctor
from signalprop.remedies import Remedy
from signalprop.train import FitResult, TrainResult, fit, train
from signalprop.trial import trial

from .zoo_helpers import finding, kinds

C = 4  # classes


def _data(n: int = 256, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable labels: the argmax of a fixed linear map of x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, C, generator=g)
    return x, (x @ w).argmax(1)


def _entropy(y: torch.Tensor) -> float:
    """Truth of the trivial baseline: the entropy of the label frequencies."""
    p = np.bincount(y.numpy(), minlength=C) / len(y)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, C))

    def forward(self, x: torch.Tensor) -> Any:
        out = self.body(x)
        return out, out.detach().abs().mean()  # (prediction, an auxiliary value)


class DictOut(TupleOut):
    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.body(x)
        d = {"logits": logits}
        if labels is not None:
            d["loss"] = F.cross_entropy(logits, labels)
        return d


def _model_output_cls() -> type:
    from transformers.utils import ModelOutput

    @dataclass
    class Out(ModelOutput):
        loss: torch.Tensor | None = None
        logits: torch.Tensor | None = None

    return Out


class HFOut(TupleOut):
    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.body(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return _model_output_cls()(loss=loss, logits=logits)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, C), nn.Linear(3, C)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.a(x1) + self.b(x2)


def _first_loss(model: nn.Module, call: Any) -> float:
    """Truth: the loss of an untouched copy on the first batch, computed by hand."""
    with torch.no_grad():
        return float(call(copy.deepcopy(model)))


@pytest.mark.parametrize("kind", ["tuple", "dict", "model_output", "dict_own_loss",
                                  "model_output_own_loss"])
def test_every_output_form_trains_on_the_same_loss(kind: str) -> None:
    x, y = _data()
    torch.manual_seed(0)
    model = {"tuple": TupleOut, "dict": DictOut, "model_output": HFOut,
             "dict_own_loss": DictOut, "model_output_own_loss": HFOut}[kind]()
    truth = _first_loss(model, lambda m: F.cross_entropy(m.body(x[:32]), y[:32]))
    if kind.endswith("own_loss"):
        # dict batches, model(**batch) computes the loss: loss_fn=None
        batches = [{"x": x[i:i + 32], "labels": y[i:i + 32]} for i in range(0, 256, 32)]
        res = fit(model, batches, None, steps=12, lr=0.5, seed=0)
    else:
        batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
        res = fit(model, batches, F.cross_entropy, steps=12, lr=0.5, seed=0)
    assert isinstance(res, FitResult) and TrainResult is FitResult
    assert res.losses[0] == pytest.approx(truth, rel=1e-6)
    assert res.losses[-1] < res.losses[0]  # it trained
    # the prediction was found (.logits / first tuple element): the baseline is known
    assert res.trivial_loss == pytest.approx(_entropy(y[:128]), abs=0.03)
    assert res.grad_ratio > 0 and math.isfinite(res.grad_ratio)


def test_several_inputs_dict_batches_with_a_loss_and_step_fn() -> None:
    x, y = _data()
    x2 = torch.randn(256, 3)
    torch.manual_seed(0)
    model = TwoInputs()
    truth = _first_loss(model, lambda m: F.cross_entropy(m(x[:32], x2[:32]), y[:32]))
    # (x1, x2, y) tuples: model(x1, x2), loss_fn(prediction, y)
    res = fit(model, [(x[:32], x2[:32], y[:32])], F.cross_entropy, steps=3, lr=0.1)
    assert res.losses[0] == pytest.approx(truth, rel=1e-6)
    # dict batches with a loss_fn: model(**batch), loss_fn(prediction, batch)
    torch.manual_seed(0)
    model = TwoInputs()
    batch = {"x1": x[:32], "x2": x2[:32]}
    res = fit(model, [batch], lambda out, b: F.cross_entropy(out, y[:32]), steps=3, lr=0.1)
    assert res.losses[0] == pytest.approx(truth, rel=1e-6)
    # step_fn: anything else; the loop sees only the loss (no trivial baseline, says why)
    torch.manual_seed(0)
    model = TwoInputs()
    calls: list[Any] = []

    def step_fn(m: nn.Module, b: Any) -> torch.Tensor:
        calls.append(b)
        return F.cross_entropy(m(b["a"], b["b"]), b["t"])

    res = fit(model, [{"a": x[:32], "b": x2[:32], "t": y[:32]}], step_fn=step_fn, steps=3, lr=0.1)
    assert res.losses[0] == pytest.approx(truth, rel=1e-6) and len(calls) == 3
    assert math.isnan(res.trivial_loss) and "step_fn" in res.trivial_kind


def test_dict_of_tensors_data_and_accumulation() -> None:
    x, y = _data(n=64)
    torch.manual_seed(0)
    model = DictOut()
    # two micro-batches per optimiser step: the step's loss is their mean
    batches = [{"x": x[:16], "labels": y[:16]}, {"x": x[16:32], "labels": y[16:32]}]
    with torch.no_grad():
        ref = copy.deepcopy(model)
        truth = 0.5 * (float(F.cross_entropy(ref.body(x[:16]), y[:16]))
                       + float(F.cross_entropy(ref.body(x[16:32]), y[16:32])))
    res = fit(model, batches, None, steps=2, accumulate=2, lr=0.1)
    assert res.losses[0] == pytest.approx(truth, rel=1e-6)
    assert res.record.get(0, "__model__", "loss") == pytest.approx(truth, rel=1e-5)
    # a dict of tensors in memory is shuffled into dict batches
    res = fit(DictOut(), {"x": x, "labels": y}, None, steps=3, batch_size=16)
    assert res.steps == 3 and not res.diverged


def test_divergence_and_ctrl_c_are_outcomes() -> None:
    x, y = _data()
    torch.manual_seed(0)
    res = fit(TupleOut(), (x, y), F.cross_entropy, steps=50, lr=1e6)
    assert res.diverged and res.diverged_reason in ("nonfinite", "loss_bound")
    last = res.losses[-1]
    assert not math.isfinite(last) or last > 100 * max(res.losses[0], 1.0)  # the policy
    assert math.isnan(res.final_loss) and res.steps == res.diverged_step + 1 < 50

    def stop(step: int, model: nn.Module, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    res = fit(TupleOut(), (x, y), F.cross_entropy, steps=50, lr=0.1, callback=stop)
    assert res.interrupted and res.steps == 5 and not res.diverged
    assert res.record.steps == [0, 1, 2, 3, 4]  # what was trained is kept
    # the old name keeps its old policy: only non-finite values stop it
    assert train(TupleOut(), (x, y), F.cross_entropy, steps=3).steps == 3


class DeadNet(nn.Module):
    """ReLU MLP whose hidden biases of -50 make every unit dead: the output cannot depend on x,
    so no training gets below the best constant prediction (the truth, by construction)."""

    def __init__(self, dead: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, C))
        if dead:
            with torch.no_grad():
                self.net[0].bias.fill_(-50.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_not_learning_fires_at_chance_and_not_on_a_learning_model() -> None:
    x, y = _data(n=512)
    h = _entropy(y)
    torch.manual_seed(0)
    dead = DeadNet(dead=True)
    with torch.no_grad():  # truth: the output is the same for every input
        out = dead(x)
        assert torch.allclose(out, out[:1].expand_as(out))
    r = doctor(dead, (x, y), nn.CrossEntropyLoss(), steps=60, lr=0.5, progress=False)
    f = finding(r.findings, "not_learning")
    assert f.numbers["trivial_loss"] == pytest.approx(h, abs=0.05)
    assert f.numbers["loss_end"] >= h - 0.05  # cannot beat the constant
    assert "dead_units" in kinds(r.findings)
    # a symptom explained by a cause finding: info, naming the cause
    assert f.severity == "info" and "Likely cause: " in f.evidence and "dead_units" in f.evidence
    torch.manual_seed(0)
    ok = doctor(DeadNet(dead=False), (x, y), nn.CrossEntropyLoss(), steps=60, lr=0.5,
                progress=False)
    assert "not_learning" not in ok.kinds
    final = sum(ok.losses[-10:]) / 10
    assert final < 0.8 * h  # truth: it learned (measured loss well below the baseline)
    assert ok.meta["trivial_loss"] == pytest.approx(h, abs=0.05)


def test_regression_baseline_is_the_target_variance() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = 3.0 + 2.0 * torch.randn(256, 1)  # pure noise: nothing to learn beyond the mean
    res = fit(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)), (x, y),
              nn.MSELoss(), steps=5, lr=0.01)
    kept = torch.cat([b for b in [y]])  # noqa: C416 -- the truth uses every target
    assert res.trivial_loss == pytest.approx(float(kept.var(unbiased=False)), rel=0.25)
    assert "variance" in res.trivial_kind


def test_better_must_beat_the_trivial_baseline() -> None:
    x, y = _data(n=512)
    h = _entropy(y)

    def blown() -> nn.Module:  # logits of size ~100: cross-entropy far above chance
        m = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, C))
        with torch.no_grad():
            m[2].weight.mul_(300.0)
        return m

    def shrink(name: str, factor: float, lr: float | None = None) -> Remedy:
        def t(model: nn.Module, batch: Any = None) -> nn.Module:
            new = copy.deepcopy(model)
            with torch.no_grad():
                new[2].weight.mul_(factor)
            return new

        return Remedy(name, transform=t, lr=lr, description="scale the head")

    table = trial(blown, (x, y), F.cross_entropy,
                  remedies=[shrink("mid", 0.3), shrink("fixed", 1 / 300, lr=1.0)],
                  steps=20, seeds=2, lr=1e-4, probe=False)
    base = table.baseline
    assert base is not None and base.loss_mean > 3 * h  # truth: far worse than chance
    mid, fixed = table["mid"], table["fixed"]
    # lower than the baseline's loss, still above chance: not "better"
    assert h < mid.loss_mean < base.loss_mean
    assert mid.verdict == "no better than trivial"
    assert fixed.loss_mean < h - 0.02 * h and fixed.verdict == "better"
    assert table.meta["trivial_loss"] == pytest.approx(h, abs=0.05)
    assert [r.remedy for r in table.improved()] == ["fixed"]


FACTORY = '''
import torch
from torch import nn
from torch.nn import functional as F


class Own(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, features, labels=None):
        logits = self.body(features)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def factory():
    torch.manual_seed(0)
    x = torch.randn(128, 6)
    rows = [{"features": x[i], "labels": int(x[i, 0] > 0)} for i in range(128)]
    return Own(), torch.utils.data.DataLoader(rows, batch_size=32, shuffle=True), None


def with_step_fn():
    model, data, _ = factory()
    return {"model": model, "data": data,
            "step_fn": lambda m, b: m(b["features"], b["labels"])["loss"]}
'''


@pytest.mark.parametrize("fn", ["factory", "with_step_fn"])
def test_cli_factory_returning_no_loss_fn(fn: str, tmp_path: Path, capsys: Any) -> None:
    from signalprop.cli import main

    p = tmp_path / "own.py"
    p.write_text(FACTORY)
    rc = main(["doctor", f"{p}:{fn}", "--steps", "6", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    d = json.loads(out)
    assert d["meta"]["steps_run"] == 6
    assert d["meta"]["loss_fn"] == ("the model's own loss" if fn == "factory"
                                    else "step_fn: <lambda>")


def test_fit_with_scaler_two_optimisers_and_clipping() -> None:
    from signalprop.record import MODEL

    x, y = _data(n=64)
    batches = [(x[:16], y[:16])]
    # fp16 autocast + a GradScaler whose scale overflows: skipped steps are counted, not
    # divergence; the scaler's own verdict (its scale went down) is the truth
    torch.manual_seed(0)
    model = TupleOut()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    res = fit(model, batches, F.cross_entropy, steps=8, lr=0.01, scaler=scaler,
              amp=torch.float16)
    assert not res.diverged and res.steps == 8
    skipped = res.extra["skipped_steps"]
    assert skipped >= 1 and skipped == sum(
        res.record.get(s, MODEL, "skipped_step", 0.0) == 1.0 for s in res.record.steps)
    assert "nonfinite" not in kinds(doctor(TupleOut(), batches, F.cross_entropy, steps=2,
                                           progress=False).findings)
    # two optimisers stepped together: both parameter sets move and get update ratios
    torch.manual_seed(0)
    model = TupleOut()
    first, rest = model.body[0], model.body[2]
    opts = [torch.optim.SGD(first.parameters(), lr=0.1), torch.optim.Adam(rest.parameters())]
    w0, w2 = first.weight.detach().clone(), rest.weight.detach().clone()
    res = fit(model, batches, F.cross_entropy, steps=3, optimizer=opts)
    assert not torch.equal(w0, first.weight) and not torch.equal(w2, rest.weight)
    assert res.record.get(1, "body.0.weight", "update_ratio") > 0
    assert res.record.get(1, "body.2.weight", "update_ratio") > 0
    # clipping: the probe records the norm before clipping (truth by autograd on a copy)
    torch.manual_seed(0)
    model = TupleOut()
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x[:16])[0], y[:16]).backward()
    truth = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in ref.parameters()))
    res = fit(model, batches, F.cross_entropy, steps=1, clip=0.01 * truth)
    assert res.record.get(0, MODEL, "grad_norm_total") == pytest.approx(truth, rel=1e-4)
    assert res.record.get(0, MODEL, "grad_norm_total_clipped") == pytest.approx(
        0.01 * truth, rel=1e-3)


def test_step_fn_through_doctor_and_trial() -> None:
    """The escape hatch reaches every entry point: the loop sees only the loss, so the trivial
    baseline is unknown (and no verdict is gated by it) but everything else is measured."""
    x, y = _data()
    x2 = torch.randn(256, 3)
    batches = [{"a": x[i:i + 32], "b": x2[i:i + 32], "t": y[i:i + 32]} for i in range(0, 256, 32)]

    def step_fn(m: nn.Module, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b["a"], b["b"]), b["t"])

    torch.manual_seed(0)
    r = doctor(TwoInputs(), batches, step_fn=step_fn, steps=10, progress=False)
    assert r.meta["steps_run"] == 10 and r.meta["loss_fn"].startswith("step_fn")
    assert math.isnan(r.meta["trivial_loss"]) and "not_learning" not in r.kinds
    assert set(r.record.layer_names(metric="out_grad_norm")) >= {"a", "b"}
    t = trial(TwoInputs, batches, step_fn=step_fn, remedies=["adam", "clip_norm", "residual"],
              steps=5, seeds=1, probe=False)
    assert t["adam"].error is None and t["clip_norm"].error is None
    assert t["residual"].verdict == "not applicable"
    assert math.isnan(t.meta["trivial_loss"])
    # valid JSON; NaN spelled as signalprop.record writes it
    assert json.loads(json.dumps(t.to_dict(), allow_nan=False))["meta"]["trivial_loss"] == "NaN"
