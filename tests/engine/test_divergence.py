"""The batched engine applies the package's one divergence policy, per member, as fit() does."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from signalprop import stats
from signalprop.data import Dataset, load_dataset
from signalprop.engine import Arch, Population, member_batches, torch_optimizer
from signalprop.engine.fit import REASONS, divergence_codes
from signalprop.record import MODEL, Record
from signalprop.train import DIVERGE_FACTOR, divergence_reason, fit

STEPS, BATCH = 30, 32


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_batched_policy_is_the_scalar_policy():
    inf, nan = math.inf, math.nan
    cases = [(loss, l0, ok, f)
             for loss in (0.5, 2.0, 99.0, 100.0, 100.5, 250.0, 1e30, inf, -inf, nan)
             for l0 in (0.1, 1.0, 2.5, nan, inf)
             for ok in (True, False) for f in (DIVERGE_FACTOR, 10.0, None)]
    for dtype in (torch.float32, torch.float64):
        for f in (DIVERGE_FACTOR, 10.0, None):
            sub = [c for c in cases if c[3] == f]
            loss = torch.tensor([c[0] for c in sub], dtype=dtype)
            l0 = torch.tensor([c[1] for c in sub], dtype=dtype)
            grad = torch.tensor([1.0 if c[2] else nan for c in sub], dtype=dtype)
            got = [REASONS[c] for c in divergence_codes(loss, l0, grad, f).tolist()]
            want = [divergence_reason(float(a), float(b), ok, f)
                    for a, b, ok in zip(loss.tolist(), l0.tolist(), [c[2] for c in sub],
                                        strict=True)]
            assert got == want, (dtype, f)


def _engine_and_fit(ds, arch_kw, lr, dtype, init_kw=None, **kw):
    """One configuration trained as a K=1 population and by fit() on the exported module."""
    arch = Arch(ds.in_features, ds.out_features, **arch_kw)
    pop = Population(arch, 1, hparams={"lr": lr}, dtype=dtype, fast_math=False)
    pop.init_([0], **(init_kw or {}))
    module = pop.member_module(0)
    res = pop.fit(ds, STEPS, BATCH, [0], record_every=5, evaluate=False, **kw)
    x = ds.x_train.to(dtype)
    batches = [(x[i], ds.y_train[i]) for i in member_batches(0, x.shape[0], BATCH, STEPS)]
    ref = fit(module, batches, nn.CrossEntropyLoss(), steps=STEPS, probe=False, seed=None,
              optimizer=torch_optimizer("sgd", module.parameters(), {"lr": lr}), **kw)
    return res, ref


RELU = {"depth": 3, "width": 16, "activation": "relu"}
CASES = [  # id, arch, lr, dtype, init, fit kwargs, expected (step, reason)
    ("healthy", {**RELU, "activation": "tanh"}, 0.1, torch.float64, None, {}, (None, None)),
    ("loss-bound", RELU, 100.0, torch.float64, None, {}, (1, "loss_bound")),
    # huge initial weights overflow float32 in the first forward pass
    ("nonfinite-at-start", RELU, 0.1, torch.float32, {"init_scale": 1e15}, {}, (0, "nonfinite")),
    # the policy's non-finite branch alone: the loss overflows float32 a few steps in
    ("nonfinite-no-bound", RELU, 100.0, torch.float32, None, {"diverge_factor": None},
     (3, "nonfinite")),
]


@pytest.mark.parametrize("name,arch_kw,lr,dtype,init_kw,kw,expected", CASES,
                         ids=[c[0] for c in CASES])
def test_population_diverges_where_fit_does(digits, name, arch_kw, lr, dtype, init_kw, kw,
                                            expected):
    res, ref = _engine_and_fit(digits, arch_kw, lr, dtype, init_kw, **kw)
    got = res.member(0)
    assert (ref.diverged_step, ref.diverged_reason) == expected
    assert (got.diverged_step, got.diverged_reason) == expected
    assert res.final[0]["diverged_reason"] == expected[1]
    assert got.steps == ref.steps and got.diverged == ref.diverged
    meta, ref_meta = res.records[0].meta, ref.record.meta
    for key in ("steps", "diverged_step", "diverged_reason", "diverge_factor"):
        assert meta[key] == ref_meta[key], key
    n = ref.steps if expected[0] is None else expected[0]  # losses before any overflow
    rtol = 1e-12 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(got.losses[:n], ref.losses[:n], rtol=rtol)
    if expected[0] is None:
        assert got.final_loss == pytest.approx(ref.final_loss, rel=1e-12)


def _population(ds, lrs, seeds):
    arch = Arch(ds.in_features, ds.out_features, depth=3, width=16, activation="relu")
    pop = Population(arch, len(lrs), hparams={"lr": lrs, "momentum": 0.5},
                     dtype=torch.float64)
    pop.init_(seeds)
    return pop, pop.fit(ds, STEPS, BATCH, seeds, record_every=5)


def test_one_diverging_member_leaves_the_others_bitwise_untouched(digits):
    pop, res = _population(digits, [0.05, 100.0, 0.1], [0, 1, 2])
    assert res.diverged_reason == [None, "loss_bound", None]
    _, without = _population(digits, [0.05, 0.1], [0, 2])
    for k, j in ((0, 0), (2, 1)):
        _, alone = _population(digits, [[0.05, 100.0, 0.1][k]], [k])
        for other, i in ((without, j), (alone, 0)):
            np.testing.assert_array_equal(res.losses[:, k], other.losses[:, i])
            assert list(res.records[k].rows()) == list(other.records[i].rows())
            assert res.final[k] == other.final[i]


def test_records_use_the_probes_schema_and_numbers(digits):
    """An engine member's record names what a Probe on the same module records, with the same
    values, and the engine's summary numbers are stats' of that record."""
    ds = digits
    arch = Arch(ds.in_features, ds.out_features, depth=3, width=16, activation="tanh",
                norm="layer")
    pop = Population(arch, 2, hparams={"lr": [0.1, 0.05]}, clip="norm", clip_threshold=0.5,
                     dtype=torch.float64)
    pop.init_([0, 1])
    module = pop.member_module(0)
    steps = 12
    res = pop.fit(ds, steps, BATCH, [0, 1], record_every=4)
    x = ds.x_train.double()
    batches = [(x[i], ds.y_train[i]) for i in member_batches(0, x.shape[0], BATCH, steps)]
    exact = {"max_forward_samples": None, "max_percentile_samples": None}  # no subsampling
    ref = fit(module, batches, nn.CrossEntropyLoss(), steps=steps, seed=None, clip=0.5,
              probe=exact, schedule=[0, 4, 8, 11], optimizer=torch_optimizer("sgd", module.parameters(), {"lr": 0.1}))
    mine, theirs = res.records[0], ref.record
    assert mine.steps == theirs.steps == [0, 4, 8, 11]
    assert set(mine.layers) == set(theirs.layers)
    for role in ("module", "param"):  # forward order within each role (grad_ratio reads it)
        assert mine.layer_names(role=role) == theirs.layer_names(role=role)
    for n, info in mine.layers.items():
        assert (info.role, info.shape) == (theirs.layers[n].role, theirs.layers[n].shape), n
    probe_keys = {(s, layer, metric) for s, layer, metric, _ in theirs.rows()}
    for s, layer, metric, v in mine.rows():
        assert (s, layer, metric) in probe_keys, (s, layer, metric)  # a probe metric
        rel = 1e-7 if layer == MODEL and metric == "loss" else 1e-9  # the probe logs in float32
        assert v == pytest.approx(theirs.get(s, layer, metric), rel=rel, abs=1e-12), (
            s, layer, metric)
    # gradient norms before clipping (as the probe's), the clipped total beside them
    assert mine.get(0, MODEL, "grad_norm_total") > 0.5
    assert mine.get(0, MODEL, "grad_norm_total_clipped") == pytest.approx(0.5, rel=1e-5)
    for k in range(2):
        m = res.member(k)
        assert m.final_loss == res.final[k]["final_loss"]  # the same function, no tolerance
        assert m.grad_ratio == res.final[k]["grad_ratio_final"]
        assert stats.grad_ratio(res.records[k], "first") == res.final[k]["grad_ratio_init"]
    assert res.member(0).final_loss == pytest.approx(ref.final_loss, rel=1e-12)
    assert res.final[0]["grad_ratio_final"] == pytest.approx(ref.grad_ratio, rel=1e-9)


def test_a_diverged_members_record_round_trips_through_json(digits):
    """The record's meta holds the run's non-finite numbers (NaN trivial loss, the diverging
    loss); they are written under the one NaN policy and read back."""
    res, _ = _engine_and_fit(digits, RELU, 0.1, torch.float32, {"init_scale": 1e15})
    rec = res.records[0]
    back = Record.from_dict(json.loads(rec.to_json()))
    assert back.meta["diverged_reason"] == "nonfinite" and back.meta["diverged_step"] == 0
    assert math.isnan(back.meta["trivial_loss"]) and not math.isfinite(back.meta["diverged_loss"])
    assert back.steps == rec.steps == [0]
