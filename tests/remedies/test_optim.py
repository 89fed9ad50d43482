"""Optimisers: SMORMS3 and vSGD against direct NumPy implementations of their equations, LARS
and layer-wise rates against closed forms, every registered name usable by the trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from signalprop.remedies import optimizers as O


def _smorms3_reference(w0: np.ndarray, grads: list[np.ndarray], lr: float, eps: float):
    """Simon Funk's SMORMS3, line by line (references.md), in float64 NumPy."""
    w = w0.copy()
    mem, g, g2 = np.ones_like(w), np.zeros_like(w), np.zeros_like(w)
    out = []
    for grad in grads:
        r = 1.0 / (mem + 1.0)
        g = (1 - r) * g + r * grad
        g2 = (1 - r) * g2 + r * grad**2
        x = g**2 / (g2 + eps)
        w = w - grad * np.minimum(lr, x) / (np.sqrt(g2) + eps)
        mem = 1 + mem * (1 - x)
        out.append(w.copy())
    return out


@pytest.mark.parametrize("lr", [1e-3, 0.5])
def test_smorms3_matches_reference(lr: float) -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3))
    # a consistent drift plus noise, so x = g^2/g2 moves through (0, 1) and min(lr, x) switches
    grads = [0.5 + rng.normal(size=(4, 3)) * s for s in np.linspace(0.1, 2.0, 40)]
    ref = _smorms3_reference(w0, grads, lr, 1e-16)
    p = torch.tensor(w0, requires_grad=True)
    opt = O.SMORMS3([p], lr=lr)
    for t, gr in enumerate(grads):
        p.grad = torch.tensor(gr)
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), ref[t], rtol=1e-12, atol=1e-14)
    assert O.OPTIMIZERS.defaults("smorms3") == {"eps": 1e-16}
    assert O.SMORMS3([torch.zeros(1, requires_grad=True)]).defaults["lr"] == 1e-3


def _vsgd_reference(w0, grad_fn, steps, init_lr=1e-3, c=2.0, eps=1e-12):
    """vSGD with the secant curvature, written as a plain per-element NumPy loop."""
    w = w0.copy()
    g = grad_fn(w, 0)
    gbar, vbar, tau = g.copy(), c * (g * g + eps), np.full_like(w, 2.0)
    prev_g, prev_w = g.copy(), w.copy()
    w = w - init_lr * g
    hbar = vhbar = None
    traj = [w.copy()]
    for t in range(1, steps):
        g = grad_fn(w, t)
        dw = np.abs(w - prev_w)
        ok = dw > np.maximum(8 * np.finfo(np.float64).eps * np.abs(w), 1e-30)
        h = np.abs(g - prev_g) / np.where(ok, dw, 1.0)
        f = 1 / tau
        if hbar is None:
            hbar, vhbar = np.where(ok, h, 0.0), c * np.where(ok, h, 0.0) ** 2 + eps
        else:
            hbar = np.where(ok, (1 - f) * hbar + f * h, hbar)
            vhbar = np.where(ok, (1 - f) * vhbar + f * h * h, vhbar)
        gbar = (1 - f) * gbar + f * g
        vbar = (1 - f) * vbar + f * g * g + eps
        vpart = gbar**2 / vbar
        rate = vpart * hbar / (vhbar + eps)
        tau = (1 - vpart) * tau + 1
        prev_g, prev_w = g.copy(), w.copy()
        w = w - rate * g
        traj.append(w.copy())
    return traj


def test_vsgd_matches_reference_on_noisy_quadratic() -> None:
    rng = np.random.default_rng(1)
    h = np.array([0.1, 1.0, 10.0, 3.0])
    wstar = np.array([1.0, -2.0, 0.5, 0.0])
    noise = rng.normal(size=(60, 4)) * 0.05

    def grad_fn(w, t):
        return h * (w - wstar) + noise[t]

    w0 = np.zeros(4)
    ref = _vsgd_reference(w0, grad_fn, 60)
    p = torch.tensor(w0, requires_grad=True)
    opt = O.VSGD([p])
    for t in range(60):
        p.grad = torch.tensor(grad_fn(p.detach().numpy(), t))
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), ref[t], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("curvature", ["secant", "fd"])
def test_vsgd_estimates_quadratic_curvature_and_converges(curvature: str) -> None:
    # deterministic quadratic: finite differences of the gradient give h exactly (closed form)
    h = torch.tensor([0.05, 0.5, 5.0, 50.0], dtype=torch.float64)
    wstar = torch.tensor([1.0, -1.0, 2.0, 0.3], dtype=torch.float64)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = O.VSGD([w], curvature=curvature)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (h * (w - wstar) ** 2).sum()
        loss.backward()
        return loss

    loss0 = float(closure().detach())
    for _ in range(200):
        if curvature == "fd":
            opt.step(closure)
        else:
            closure()
            opt.step()
    st = opt.state[w]
    torch.testing.assert_close(st["hbar"], h, rtol=1e-6, atol=0)
    assert float(closure().detach()) < 1e-6 * loss0
    # a per-parameter rate: the stiff coordinate did not force a tiny rate on the flat one
    assert abs(float(w.detach()[0] - wstar[0])) < 1e-2


def test_vsgd_fd_needs_closure() -> None:
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="closure"):
        O.VSGD([p], curvature="fd").step()
    with pytest.raises(ValueError, match="valid choices"):
        O.VSGD([p], curvature="bbprop")


def test_lars_first_step_closed_form() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    for p in lin.parameters():
        p.grad = torch.randn_like(p)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
    O.LARS(lin.parameters(), lr=0.5, momentum=0.0, trust=0.02).step()
    expected = w0 - 0.5 * 0.02 * w0.norm() / gw.norm() * gw
    torch.testing.assert_close(lin.weight.detach(), expected)
    torch.testing.assert_close(lin.bias.detach(), b0 - 0.5 * 0.02 * gb)  # 1-d: plain rate
    # the relative update of the matrix is lr * trust whatever the gradient's size
    for scale in (1e-8, 1e4):
        lin2 = nn.Linear(6, 4)
        lin2.weight.grad = torch.randn(4, 6) * scale
        w = lin2.weight.detach().clone()
        O.LARS([lin2.weight], lr=1.0, momentum=0.0, trust=0.01).step()
        assert float((lin2.weight.detach() - w).norm() / w.norm()) == pytest.approx(0.01, rel=1e-4)


def test_layerwise_rates_scale_with_depth() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = O.layerwise(model, lr=0.1, first_layer_factor=100.0)
    lrs = [g["lr"] for g in opt.param_groups]
    np.testing.assert_allclose(lrs, [10.0, 1.0, 0.1])
    assert isinstance(opt, torch.optim.SGD)
    opt2 = O.make_optimizer("layerwise", model, lr=0.2, base="adam", first_layer_factor=4.0)
    assert isinstance(opt2, torch.optim.Adam)
    np.testing.assert_allclose([g["lr"] for g in opt2.param_groups], [0.8, 0.4, 0.2])


@pytest.mark.parametrize("name", sorted(O.OPTIMIZERS.names()))
def test_every_optimizer_builds_through_the_trainer_and_steps(name: str) -> None:
    from signalprop.train import make_optimizer as train_make

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = train_make(name, model, lr=O.DEFAULT_LR[name])
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert set(O.DEFAULT_LR) == set(O.OPTIMIZERS.names())


def test_unknown_optimizer_lists_names() -> None:
    with pytest.raises(ValueError, match="smorms3"):
        O.make_optimizer("smorm3", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="positive"):
        O.make_optimizer("adam", nn.Linear(2, 2), lr=-1.0)
