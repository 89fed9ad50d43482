"""Zoo: fp16 autocast with a GradScaler on the CPU. Steps the scaler skips are recorded as
skipped (not merged, not a NaN finding) and the loss scale is divided out of every norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signalprop.diagnosis import diagnose
from signalprop.probe import Probe
from signalprop.record import MODEL

from .zoo_helpers import kinds


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 3))


def _setup(init_scale: float):
    """A seeded net, SGD, a CPU GradScaler starting at ``init_scale`` and one fixed batch."""
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return model, opt, scaler, torch.randn(16, 8), torch.randint(0, 3, (16,))


def _scaled_backward(model: nn.Module, opt, scaler, x, y) -> torch.Tensor:
    """zero_grad, an fp16-autocast forward and the scaled loss's backward; returns the loss."""
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    return loss


def _scaler_step(scaler, opt) -> bool:
    """The scaler's step and update; True when it skipped the step (the scale went down)."""
    before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale() < before


def test_gradscaler_skipped_steps_and_unscaled_norms():
    # a scale this large overflows fp16 gradients: the scaler skips steps and halves it
    model, opt, scaler, x, y = _setup(2.0**24)
    skipped, truth_out, truth_total = [], [], []
    with Probe(model, optimizer=opt, scaler=scaler) as p:
        for _ in range(9):
            # truth on a copy: the same autocast forward, gradients of the unscaled loss
            ref = _net()  # a fresh copy (deepcopy would copy the probe's hooks too)
            ref.load_state_dict(model.state_dict())
            with torch.autocast("cpu", dtype=torch.float16):
                h = ref[:4](x)
                out = ref[4](h)
                out.retain_grad()
                rl = F.cross_entropy(out, y)
            (rl * scaler.get_scale()).backward()
            truth_out.append(out.grad.float().norm().item() / scaler.get_scale())
            truth_total.append(
                math.sqrt(sum(q.grad.double().norm().item() ** 2 for q in ref.parameters()))
                / scaler.get_scale())
            p.log(loss=_scaled_backward(model, opt, scaler, x, y))
            skipped.append(_scaler_step(scaler, opt))  # the scaler's own verdict
    r = p.record
    assert r.steps == list(range(9))  # one record step per iteration: nothing merged
    assert any(skipped) and not all(skipped)
    for s in r.steps:
        assert (r.get(s, MODEL, "skipped_step", 0.0) == 1.0) == skipped[s]
        if not skipped[s]:
            assert r.get(s, "4", "out_grad_norm") == pytest.approx(truth_out[s], rel=2e-3)
            assert r.get(s, MODEL, "grad_norm_total") == pytest.approx(truth_total[s], rel=2e-3)
            assert not r.has("grad_norm_total_clipped") or math.isnan(
                r.get(s, MODEL, "grad_norm_total_clipped"))
    f = diagnose(r)
    assert "nonfinite" not in kinds(f) and "exploding_gradients" not in kinds(f)


def test_skipped_steps_detected_without_the_scaler():
    # the scaler not given to the probe: a backward followed by zero_grad() without an
    # optimiser step still closes the step as skipped (norms then stay scaled)
    model, opt, scaler, x, y = _setup(2.0**24)
    skipped = []
    with Probe(model, optimizer=opt) as p:
        for _ in range(8):
            p.log(loss=_scaled_backward(model, opt, scaler, x, y))
            skipped.append(_scaler_step(scaler, opt))
        opt.zero_grad()
        model(x)  # the next iteration's forward reveals whether the last step was skipped
    r = p.record
    assert any(skipped) and not all(skipped)
    assert r.steps == list(range(8))
    assert [r.get(s, MODEL, "skipped_step", 0.0) == 1.0 for s in r.steps] == skipped
    assert "nonfinite" not in kinds(diagnose(r))


def test_scaler_with_manual_step_boundaries_does_not_close_steps_early():
    # a loop that drives the probe itself (like the Lightning callback) and gives it the scaler
    model, opt, scaler, x, y = _setup(2.0**8)
    with Probe(model, scaler=scaler) as p:
        for _ in range(3):
            _scaled_backward(model, opt, scaler, x, y)
            p.gradients_ready()
            scaler.step(opt)
            scaler.update()
            p.stepped()
    r = p.record
    assert r.steps == [0, 1, 2]
    assert all(r.get(s, MODEL, "loss_scale") == 2.0**8 for s in r.steps)
    assert not r.has("skipped_step")
