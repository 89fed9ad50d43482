"""Initialisations: variances against their formulas, orthogonality, LSUV convergence."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from signalprop import init


def _mlp(act: type[nn.Module], depth: int = 20, width: int = 64, d_in: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


@pytest.mark.parametrize(
    "fn, kwargs, expected_var",
    [
        (init.xavier_, {}, 2 / (300 + 500)),
        (init.xavier_, {"gain": 2.0, "distribution": "uniform"}, 4 * 2 / (300 + 500)),
        (init.kaiming_, {}, 2 / 500),  # weight [300, 500]: fan_in 500
        (init.kaiming_, {"mode": "fan_out"}, 2 / 300),
        (init.kaiming_, {"nonlinearity": "tanh"}, (5 / 3) ** 2 / 500),
    ],
)
def test_variance_formulas(fn, kwargs, expected_var) -> None:
    w = torch.empty(300, 500)
    fn(w, **kwargs)
    # 150k samples: the sample variance is within ~0.4% (1 sd) of the truth
    assert float(w.var()) == pytest.approx(expected_var, rel=0.03)


def test_module_init_touches_every_layer_and_zeroes_biases() -> None:
    m = _mlp(nn.Tanh, depth=3)
    init.kaiming_(m)
    for layer in init.weight_layers(m):
        assert float(layer[1].bias.detach().abs().max()) == 0.0
    init.xavier_(m, bias=None)  # biases untouched
    with torch.no_grad():
        m[0].bias.fill_(0.3)
    init.xavier_(m, bias=None)
    assert float(m[0].bias.detach()[0]) == pytest.approx(0.3)


def test_orthogonal_gain() -> None:
    w = torch.empty(40, 60)
    init.orthogonal_(w, gain=1.7)
    torch.testing.assert_close(w @ w.t(), 1.7**2 * torch.eye(40), atol=1e-4, rtol=0)
    m = nn.Sequential(nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 30))
    init.orthogonal_(m)
    for _, layer in init.weight_layers(m):
        torch.testing.assert_close(layer.weight.t() @ layer.weight, torch.eye(30), atol=1e-5, rtol=0)


def test_scale() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = [p.detach().clone() for p in m.parameters()]
    init.scale_(m, 3.0)
    after = list(m.parameters())
    torch.testing.assert_close(after[0], 3 * before[0])  # weight scaled
    torch.testing.assert_close(after[1], before[1])  # bias not (bias=False)
    with pytest.raises(ValueError):
        init.scale_(m, float("nan"))


def test_bad_targets() -> None:
    with pytest.raises(ValueError, match="no nn.Linear"):
        init.xavier_(nn.Tanh())
    with pytest.raises(ValueError, match=">= 2 dimensions"):
        init.kaiming_(torch.empty(5))
    with pytest.raises(ValueError, match="fan_in"):
        init.kaiming_(torch.empty(3, 3), mode="fan_sideways")
    with pytest.raises(ValueError, match="initialisation"):
        init.INITS.get("glorot")


def _layer_output_vars(model: nn.Module, x: torch.Tensor) -> list[float]:
    out: list[float] = []
    hs = [m.register_forward_hook(lambda mod, i, o: out.append(float(o.double().var())))
          for _, m in init.weight_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return out


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid])
def test_lsuv_reaches_unit_variance_on_deep_nets(act: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = _mlp(act, depth=30)
    x = torch.randn(256, 32)
    before = _layer_output_vars(model, x)
    assert max(abs(v - 1) for v in before) > 0.5  # default init is far from unit variance
    res = init.lsuv_(model, x, tol=0.05, max_iter=10)
    assert res.converged and not res.not_converged
    after = _layer_output_vars(model, x)
    assert len(after) == 31
    # measured independently of the function's own report, on the same batch
    assert max(abs(v - 1) for v in after) < 0.05
    for name, v in res.variances.items():
        assert abs(v - 1) < 0.05, name


def test_lsuv_with_biases_iterates_and_converges() -> None:
    torch.manual_seed(0)
    model = _mlp(nn.Tanh, depth=8)
    x = torch.randn(256, 32)
    init.orthogonal_(model)
    with torch.no_grad():
        for _, layer in init.weight_layers(model):
            layer.bias.uniform_(-0.5, 0.5)
    # keep the biases: a rescaled W no longer lands on Var 1 in one step, so the loop iterates
    res = init.lsuv_(model, x, tol=0.01, max_iter=50, pre_init=False)
    assert res.converged
    assert max(res.iterations.values()) > 1
    assert max(abs(v - 1) for v in _layer_output_vars(model, x)) < 0.01


def test_lsuv_reports_non_convergence() -> None:
    # a layer fed by a dead ReLU layer sees a constant input: its output variance stays 0
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(64, 8)
    init.orthogonal_(model)

    class Dead(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h * 0

    model[1] = Dead()
    with pytest.warns(RuntimeWarning, match="did not reach"):
        res = init.lsuv_(model, x)
    assert not res.converged
    assert res.not_converged == ["2", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init.lsuv_(model, x, warn=False)  # no warning when asked not to


def test_lsuv_bad_input() -> None:
    model = _mlp(nn.Tanh, depth=2)
    with pytest.raises(ValueError, match="at least 2"):
        init.lsuv_(model, torch.randn(1, 32))
    with pytest.raises(TypeError):
        init.lsuv_(model, [[0.0] * 32])


def test_registry_and_critical_reexport() -> None:
    assert set(init.INITS.names()) == {"xavier", "kaiming", "orthogonal", "lsuv", "scale",
                                       "critical", "lecun", "default"}
    w = torch.empty(64, 64)
    init.apply_init("orthogonal", w, gain=2.0)
    assert float(torch.linalg.svdvals(w).min()) == pytest.approx(2.0, rel=1e-4)
    try:
        from signalprop.theory.torch_adapter import critical_  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torch_adapter"):
            init.critical_(nn.Linear(2, 2))
    else:
        m = _mlp(nn.Tanh, depth=3, width=400, d_in=400)
        init.critical_(m, activation="tanh")
        # tanh without bias noise is critical at sigma_w = 1: Var W = 1 / fan_in
        w = m[2].weight
        assert float(w.detach().var()) * 400 == pytest.approx(1.0, rel=0.05)
        assert math.isfinite(float(w.detach().sum()))
