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


def _step_and_check_ratios(model: nn.Module, opt: torch.optim.Optimizer, p: Probe, step: int,
                           x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of ``opt``; every parameter's recorded update ratio against a weight copy."""
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    before = [q.detach().double().clone() for q in model.parameters()]
    opt.step()
    for (name, q), b in zip(model.named_parameters(), before, strict=True):
        want = float((q.detach().double() - b).norm() / b.norm())
        assert p.record.get(step, name, "update_ratio") == pytest.approx(want, rel=1e-4), name


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd-momentum"])
def test_optimizer_load_state_dict_mid_run_and_lr_changes(opt_name: str) -> None:
    # a checkpoint resumed (the optimiser rewound by load_state_dict) with the learning rate
    # set by hand each step: Adam's closed form kept counting its own steps past the reload
    # (bias correction of the wrong step: update ratios ~13% off)
    import copy

    model = _net()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}]
    opt = (torch.optim.Adam(groups, lr=1e-2) if opt_name == "adam"
           else torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1) if opt_name == "adamw"
           else torch.optim.SGD(groups, lr=0.1, momentum=0.9))
    p = Probe(model, optimizer=opt).attach()
    torch.manual_seed(1)
    x, y = torch.randn(5, 6), torch.randn(5, 2)
    saved = None
    for step in range(7):
        if step == 2:
            saved = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
        if step == 5:
            opt.load_state_dict(saved[0])
            model.load_state_dict(saved[1])
        for i, g in enumerate(opt.param_groups):
            g["lr"] = 0.01 * (step + 1) * (i + 1)
        _step_and_check_ratios(model, opt, p, step, x, y)
        assert p.record.get(step, "__model__", "lr") == pytest.approx(0.01 * (step + 1))
    p.detach()


class _Gan(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.G = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
        self.D = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def d_loss(self, z: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return self.D(real).mean() - self.D(self.G(z).detach()).mean()


def _d_oracle(model: _Gan, z: torch.Tensor, real: torch.Tensor) -> tuple[_Gan, float]:
    """An unprobed copy of ``model`` and ||dL_D/dW|| of D's first layer on it."""
    ref = _Gan()
    ref.load_state_dict(model.state_dict())
    ref.d_loss(z, real).backward()
    return ref, float(ref.D[0].weight.grad.double().norm())


@pytest.mark.parametrize("flush_every", [1, 4])
def test_two_optimisers_stepping_in_turn_on_their_own_losses(flush_every: int) -> None:
    # one probe, GAN-like: D steps on D's loss, then G's loss is backpropagated and G steps.
    # G's gradient norms were read when D stepped: None on the first step (G's input to D is
    # detached), the previous iteration's G gradients after that (flush_every=4: values
    # waiting on the device, as on an accelerator)
    model = _Gan()
    opt_d = torch.optim.SGD(model.D.parameters(), lr=0.1)
    opt_g = torch.optim.Adam(model.G.parameters(), lr=0.01)
    p = Probe(model, optimizer=[opt_d, opt_g], flush_every=flush_every).attach()
    torch.manual_seed(1)
    for step in range(3):
        z, real = torch.randn(5, 4), torch.randn(5, 6)
        ref, want_d = _d_oracle(model, z, real)
        opt_d.zero_grad()
        model.d_loss(z, real).backward()
        opt_d.step()
        ref.load_state_dict(model.state_dict())
        ref.zero_grad()
        ref.D(ref.G(z)).mean().backward()
        opt_g.zero_grad()
        model.D(model.G(z)).mean().backward()
        before = model.G[0].weight.detach().double().clone()
        opt_g.step()
        r = p.record
        assert r.get(step, "D.0.weight", "grad_norm") == pytest.approx(want_d, rel=1e-5)
        for name in ("G.0.weight", "G.2.bias"):
            want = float(ref.get_parameter(name).grad.double().norm())
            assert r.get(step, name, "grad_norm") == pytest.approx(want, rel=1e-5), name
        after = model.G[0].weight.detach().double()
        assert r.get(step, "G.0.weight", "update_ratio") == pytest.approx(
            float((after - before).norm() / before.norm()), rel=1e-4)
    assert p.record.steps == [0, 1, 2]
    p.detach()


def test_optimizer_swapped_and_rebound() -> None:
    # switching optimiser mid-run (SGD to Adam) and rebinding it (detach, probe.optimizer =
    # ..., attach): the update ratios kept coming from the old SGD's closed form
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Probe(model, optimizer=opt).attach()
    torch.manual_seed(1)
    for step in range(4):
        if step == 2:
            p.detach()
            opt = torch.optim.Adam(model.parameters(), lr=0.01)
            p.optimizer = opt
            p.attach()
        x, y = torch.randn(5, 6), torch.randn(5, 2)
        _step_and_check_ratios(model, opt, p, step, x, y)
    p.detach()


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        return self.a(x) + (self.b(x) if use_b else 0)


@pytest.mark.parametrize("schedule", [None, 2])
def test_adam_parameter_without_gradient_on_some_steps(schedule: int | None) -> None:
    # conditional computation (a branch or expert left out of some steps): Adam skips a
    # parameter without a gradient, so its step count lags its group's; the closed form
    # corrected it with the group's count (update ratios ~27% off once the branch was back)
    model = _Branch()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    p = Probe(model, optimizer=opt, schedule=schedule).attach()
    torch.manual_seed(1)
    for step in range(7):
        x, y = torch.randn(5, 6), torch.randn(5, 2)
        opt.zero_grad()
        (model(x, step in (0, 4, 5, 6)) - y).pow(2).mean().backward()
        before = [q.detach().double().clone() for q in model.parameters()]
        opt.step()
        if step not in p.record.steps:
            continue
        for (name, q), b in zip(model.named_parameters(), before, strict=True):
            want = float((q.detach().double() - b).norm() / b.norm())
            assert p.record.get(step, name, "update_ratio") == pytest.approx(
                want, rel=1e-4, abs=1e-12), (step, name)
    p.detach()


@pytest.mark.parametrize("kw", [{}, {"forward": False, "backward": False}, {"schedule": 2}])
def test_two_probes_on_a_gan(kw: dict) -> None:
    # one probe on D, one on G: G's loss backpropagated through D, then D's gradients zeroed,
    # looked to D's probe like a step a GradScaler skipped: recorded as skipped, and from then
    # on D's values one step late (9 probe steps for 5 iterations)
    model = _Gan()
    g_net, d_net = model.G, model.D
    opt_d = torch.optim.SGD(d_net.parameters(), lr=0.1)
    opt_g = torch.optim.Adam(g_net.parameters(), lr=0.01)
    p_d = Probe(d_net, optimizer=opt_d, **kw).attach()
    p_g = Probe(g_net, optimizer=opt_g, **kw).attach()
    torch.manual_seed(1)
    for step in range(5):
        z, real = torch.randn(5, 4), torch.randn(5, 6)
        ref, want_d = _d_oracle(model, z, real)
        opt_d.zero_grad()
        model.d_loss(z, real).backward()  # (model.D is d_net, model.G is g_net)
        opt_d.step()
        ref.load_state_dict(model.state_dict())
        ref.zero_grad()
        ref.D(ref.G(z)).mean().backward()
        want_g = float(ref.G[0].weight.grad.double().norm())
        opt_g.zero_grad()
        d_net(g_net(z)).mean().backward()
        opt_g.step()
        if step in p_d.record.steps:
            assert p_d.record.get(step, "0.weight", "grad_norm") == pytest.approx(want_d, rel=1e-5)
            assert "skipped_step" not in p_d.record.data[step].get("__model__", {})
            assert p_g.record.get(step, "0.weight", "grad_norm") == pytest.approx(want_g, rel=1e-5)
    want_steps = [0, 2, 4] if kw.get("schedule") else list(range(5))
    assert p_d.record.steps == want_steps and p_g.record.steps == want_steps
    p_d.detach()
    p_g.detach()
