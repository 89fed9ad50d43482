"""Zoo: training-loop patterns a probe must follow (fine-tuning that unfreezes layers, ...),
each checked against an oracle: autograd on an unprobed copy, or a copy of the weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from signalprop import Probe


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("add_group", [False, True])
def test_layers_unfrozen_mid_training_are_measured(opt_name: str, add_group: bool) -> None:
    # the measured parameters were fixed at construction from requires_grad: a backbone
    # unfrozen later was never measured; with add_param_group its update ratios need the new
    # group, and Adam's closed form its own step count (not the group's)
    model = _net()
    model[0].requires_grad_(False)
    make = torch.optim.SGD if opt_name == "sgd" else torch.optim.Adam
    lr = 0.1 if opt_name == "sgd" else 0.01
    opt = make((model[2] if add_group else model).parameters(), lr=lr)
    p = Probe(model, optimizer=opt).attach()
    torch.manual_seed(1)
    for step in range(4):
        x, y = torch.randn(5, 6), torch.randn(5, 2)
        if step == 2:
            model[0].requires_grad_(True)
            if add_group:
                opt.add_param_group({"params": list(model[0].parameters()), "lr": lr / 2})
        ref = _net()
        ref.load_state_dict(model.state_dict())
        ref[0].requires_grad_(step >= 2)
        (ref(x) - y).pow(2).mean().backward()
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        before = model[0].weight.detach().double().clone()
        opt.step()
        r = p.record
        assert r.get(step, "2.weight", "grad_norm") == pytest.approx(
            float(ref[2].weight.grad.double().norm()), rel=1e-5)
        if step >= 2:
            assert r.get(step, "0.weight", "grad_norm") == pytest.approx(
                float(ref[0].weight.grad.double().norm()), rel=1e-5)
            want = float((model[0].weight.detach().double() - before).norm() / before.norm())
            assert want > 0
            assert r.get(step, "0.weight", "update_ratio") == pytest.approx(want, rel=1e-4)
        else:
            assert "0.weight" not in r.data.get(step, {})
    p.detach()
