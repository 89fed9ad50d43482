"""The studies speak the library's language: remedies by their registry names, applied by the
library, and training through the package's one loop (``signalprop.train.fit``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from signalprop.lab import clipping as C
from signalprop.lab import recurrent as R
from signalprop.lab import remedy_ranking as RR
from signalprop.remedies import REMEDIES, AddDecayedWeights, ClipByGlobalNorm


def test_remedies_study_names_registry_remedies() -> None:
    for case in RR.TEXTBOOK.values():
        for m in case:
            assert m in REMEDIES or m in RR.RELU_FAMILY, m
    assert all(m in REMEDIES for m in RR.MEASURES)
    cfg = RR.get_config(True)
    clip = RR.remedy("clip_norm", cfg).make_grad_transform()
    assert isinstance(clip, ClipByGlobalNorm) and clip.max_norm == cfg["clip_norm"]
    wd = RR.remedy("weight_decay", cfg).make_grad_transform()
    assert isinstance(wd, AddDecayedWeights) and wd.weight_decay == cfg["weight_decay"]
    assert RR.remedy("lower_lr", cfg).lr_scale == 0.1
    assert RR.remedy("untreated", cfg) is None


def test_remedies_relu_family_swaps_and_reinitialises() -> None:
    """leaky_relu has no remedy of its own: the registry's swap_activation transform plus
    kaiming_init: every activation swapped, weights at He scale (Var W = 2 / fan_in)."""
    cfg = {**RR.get_config(True), "width": 256}
    torch.manual_seed(0)
    model = RR._model(cfg, cfg["vanishing"], 256, 10)
    new = RR.remedy("leaky_relu", cfg).apply(model, torch.randn(8, 256))
    acts = [m for m in new.modules() if isinstance(m, (nn.Sigmoid, nn.LeakyReLU))]
    assert acts and all(isinstance(m, nn.LeakyReLU) for m in acts)
    w = [m.weight for m in new.modules() if isinstance(m, nn.Linear)][1]
    assert float(w.detach().var()) * 256 == pytest.approx(2.0, rel=0.05)
    # the untreated net: Var W = init_scale^2 / fan_in, and the original is left as it was
    w0 = [m.weight for m in model.modules() if isinstance(m, nn.Linear)][1]
    assert float(w0.detach().var()) * 256 == pytest.approx(1 / 3, rel=0.05)


def test_clipping_methods_are_registry_remedies() -> None:
    th = C.get_config(True)["thresholds"]
    for method, name in C.REMEDY_NAMES.items():
        assert name is None or name in REMEDIES, name
        rem = C.remedy(method, th)
        assert (rem is None) == (method == "none")
    assert C.remedy("norm", th).make_grad_transform().max_norm == th["norm"]
    assert C.remedy(C.SLOW, th).lr_scale == 0.1


def test_clipping_rnn_run_reads_records() -> None:
    """One tiny RNN run through fit: the through-time profile and the gradient norm come from
    the probe's record, the loop's divergence flag is reported."""
    cfg = C.get_config(True)
    cfg["rnn"] = {**cfg["rnn"], "hidden": 8, "length": 6, "steps": 12, "batch_size": 8,
                  "test_size": 16}
    r = C._rnn_one(cfg, "norm", 0.05, 0)
    assert len(r["grad_t_init"]) == 6 and all(g > 0 for g in r["grad_t_init"])
    assert math.isfinite(r["max_grad_norm"]) and r["max_grad_norm"] > 0
    assert r["diverged"] is False and math.isfinite(r["final_loss"])


def test_recurrent_arms_are_registry_remedies() -> None:
    for _, names in R.ARMS.values():
        assert all(n in REMEDIES for n in names)


def test_an_interrupted_run_is_not_returned_as_finished() -> None:
    """fit hands a user the steps trained when Ctrl-C stops it; the lab's fit raises instead, so
    a study never caches a partial run as a finished one."""
    from torch.nn import functional as F

    from signalprop.lab import nets
    from signalprop.train import fit

    def stop(step: int, model: nn.Module, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    res = fit(nn.Linear(4, 2), (x, y), F.cross_entropy, steps=10, probe=None, callback=stop)
    assert res.interrupted and res.steps == 3
    with pytest.raises(KeyboardInterrupt):
        nets.fit(nn.Linear(4, 2), (x, y), F.cross_entropy, steps=10, probe=None, callback=stop)
    assert not nets.fit(nn.Linear(4, 2), (x, y), F.cross_entropy, steps=3, probe=None).interrupted
