"""Activations: registry, canonical kinds shared with the probe, RBF gradients, Scaled gains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from signalprop.probe.modules import activation_kind as probe_kind
from signalprop.remedies.activations import (
    ACTIVATIONS,
    RBF,
    Scaled,
    activation_kind,
    infer_activation,
    make_activation,
    nf_gain,
)

CANONICAL = [
    "linear", "relu", "leaky_relu", "rrelu", "elu", "selu", "gelu", "silu", "softplus",
    "sigmoid", "tanh", "softsign", "hardtanh", "erf", "gaussian", "sin",
    # the probe always knew these torch classes; the vocabulary made them buildable too
    "relu6", "celu", "mish", "hardsigmoid", "hardswish", "logsigmoid", "tanhshrink",
]


def test_registry_holds_exactly_the_canonical_names() -> None:
    assert sorted(ACTIVATIONS.names()) == sorted(CANONICAL)


@pytest.mark.parametrize("name", CANONICAL)
def test_every_activation_builds_runs_and_reports_its_kind(name: str) -> None:
    m = make_activation(name)
    # the probe reads the same canonical name (torch class or signalprop_activation attribute)
    assert activation_kind(m) == name
    assert probe_kind(m) == name
    x = torch.randn(8, 5, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unknown_activation_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="sigmoid"):
        make_activation("sigmiod")


def test_custom_activations_match_numpy() -> None:
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    xn = x.numpy()
    np.testing.assert_allclose(make_activation("gaussian")(x).numpy(), np.exp(-xn**2 / 2), rtol=1e-12)
    np.testing.assert_allclose(make_activation("erf")(x).numpy(), special.erf(xn), rtol=1e-12)
    np.testing.assert_allclose(make_activation("sin")(x).numpy(), np.sin(xn), rtol=1e-12)
    np.testing.assert_allclose(make_activation("linear")(x).numpy(), xn)


def test_rbf_matches_direct_formula() -> None:
    torch.manual_seed(1)
    layer = RBF(3, 4, width=0.7).double()
    with torch.no_grad():
        layer.kernel.log_width.copy_(torch.log(torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)))
    x = torch.randn(6, 3, dtype=torch.float64)
    c = layer.distance.centers.detach().numpy()
    s = np.array([0.5, 1.0, 1.5, 2.0])
    d2 = ((x.numpy()[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_allclose(layer(x).detach().numpy(), np.exp(-d2 / (2 * s**2)), rtol=1e-10)
    # the squared-distance pre-activation is its own module (where a norm can go)
    np.testing.assert_allclose(layer.distance(x).detach().numpy(), d2, rtol=1e-10)
    assert activation_kind(layer.kernel) == "rbf"


def test_rbf_gradcheck_float64() -> None:
    torch.manual_seed(2)
    layer = RBF(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, c: torch.Tensor, lw: torch.Tensor) -> torch.Tensor:
        d2 = (x * x).sum(-1, keepdim=True) - 2 * x @ c.t() + (c * c).sum(-1)
        return torch.exp(-d2.clamp_min(0) * torch.exp(-2 * lw) / 2)

    # gradients w.r.t. input, centres and widths, through the module's own forward
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,), eps=1e-6, atol=1e-8)
    c = layer.distance.centers.detach().clone().requires_grad_(True)
    lw = layer.kernel.log_width.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, c, lw), eps=1e-6, atol=1e-8)
    # and the module's parameter gradients equal those of the explicit formula
    layer(x).sum().backward()
    f(x, c, lw).sum().backward()
    torch.testing.assert_close(layer.distance.centers.grad, c.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.kernel.log_width.grad, lw.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid", "gaussian", "selu"])
def test_scaled_nf_gain_gives_unit_std(name: str) -> None:
    m = Scaled(name, "nf")
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    std = float(m(z).std())
    assert abs(std - 1.0) < 0.01  # Monte Carlo std error ~ 0.002
    # NFNets' published ReLU gain: sqrt(2 / (1 - 1/pi))
    if name == "relu":
        assert nf_gain(torch.relu) == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-5)


def test_scaled_fixed_and_learnable() -> None:
    m = Scaled(torch.nn.Tanh(), 2.0)
    x = torch.randn(7)
    torch.testing.assert_close(m(x), 2.0 * torch.tanh(x))
    assert not list(m.parameters())
    ml = Scaled("tanh", 1.5, learnable=True)
    assert [n for n, _ in ml.named_parameters()] == ["a"]
    ml(x).sum().backward()
    torch.testing.assert_close(ml.a.grad, torch.tanh(x).sum())
    assert activation_kind(ml) is None and activation_kind(ml.phi) == "tanh"
    with pytest.raises(ValueError):
        Scaled("tanh", "big")
    with pytest.raises(ValueError, match="zero variance"):
        nf_gain(torch.zeros_like)


def test_infer_activation() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2))
    assert infer_activation(m) == "tanh"
    with pytest.raises(ValueError, match="no activation modules"):
        infer_activation(torch.nn.Linear(2, 2))
    mixed = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh())
    with pytest.raises(ValueError, match="mixes"):
        infer_activation(mixed)
