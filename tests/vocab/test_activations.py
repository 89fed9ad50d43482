"""The activation vocabulary: every face of every entry agrees with the others (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from signalprop import stats
from signalprop.engine.activations import ACTIVATIONS as ENGINE
from signalprop.remedies.activations import ACTIVATIONS as REMEDIES
from signalprop.theory.activations import ACTIVATIONS as THEORY
from signalprop.theory.activations import get_activation as theory_activation
from signalprop.vocab import ACTIVATIONS, activation, activation_kind, infer_activation

NAMES = ACTIVATIONS.names()
WITH_NUMPY = [n for n in NAMES if activation(n).numpy is not None]
WITH_KERNEL = [n for n in NAMES if activation(n).kernel is not None]
WITH_SATURATION = [n for n in NAMES if activation(n).saturation is not None]

# points away from kinks (|z| = 1 for hardtanh, 0 for relu, 6 for relu6), where phi' is defined
Z = torch.tensor([-7.0, -3.1, -1.3, -0.7, -0.2, 0.15, 0.6, 1.4, 2.9, 6.5], dtype=torch.float64)


def test_the_faces_the_package_had_are_all_present() -> None:
    # what the theory, engine, remedies, probe and stats tables held before they became views
    assert set(WITH_NUMPY) == {"linear", "relu", "leaky_relu", "elu", "selu", "gelu", "silu",
                               "softplus", "sigmoid", "tanh", "softsign", "hardtanh", "erf",
                               "gaussian", "sin"}
    assert set(WITH_KERNEL) == {"linear", "tanh", "sigmoid", "relu", "leaky_relu", "elu", "selu",
                                "gelu", "softplus", "softsign", "gaussian", "silu", "hardtanh",
                                "relu6"}
    assert set(WITH_SATURATION) == {"sigmoid", "tanh", "softsign", "gaussian", "hardtanh"}
    assert stats.RECTIFIERS == {"relu", "relu6", "leaky_relu", "rrelu"}
    assert set(THEORY.names()) == set(WITH_NUMPY) and set(ENGINE.names()) == set(WITH_KERNEL)
    assert REMEDIES.names() == NAMES and set(stats.SATURATING) == {*WITH_SATURATION, "rbf"}


@pytest.mark.parametrize("name", NAMES)
def test_module_face_is_recognised_by_the_probe(name: str) -> None:
    m = activation(name)()
    assert isinstance(m, nn.Module)
    assert activation_kind(m) == name
    assert infer_activation(nn.Sequential(nn.Linear(3, 3), m, nn.Linear(3, 1))) == name
    m.eval()  # rrelu's slope is random in training mode
    y = m(Z)
    assert y.shape == Z.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", WITH_NUMPY)
def test_numpy_face_matches_the_module_and_autograd(name: str) -> None:
    """phi (NumPy, float64) vs nn.Module (float64): rtol 1e-12; phi' vs autograd: rtol 1e-9."""
    phi, dphi = activation(name).phi()
    z = Z.clone().requires_grad_(True)
    y = activation(name)().double()(z)
    (g,) = torch.autograd.grad(y.sum(), z)
    x = Z.numpy()
    np.testing.assert_allclose(phi(x), y.detach().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dphi(x), g.numpy(), rtol=1e-9, atol=1e-15)
    act = theory_activation(name)
    assert act.name == name and act.hparams == {k: float(v) for k, v in ACTIVATIONS.defaults(name).items()}
    np.testing.assert_array_equal(act(x), phi(x))


@pytest.mark.parametrize("name", WITH_KERNEL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_engine_kernel_matches_the_module_and_autograd(name: str, dtype: torch.dtype) -> None:
    """forward vs nn.Module and backward vs autograd: rtol 1e-12 in float64, 1e-6 in float32;
    the float32 fast form (tanh via sigmoid) within its stated 1.8e-7 absolute error (+ rounding)."""
    k = activation(name).kernel
    assert k is not None
    z = Z.to(dtype).requires_grad_(True)
    y = activation(name)().to(dtype)(z)
    dh = torch.linspace(-1.0, 1.0, len(Z), dtype=dtype)
    (g,) = torch.autograd.grad(y, z, dh)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    with torch.no_grad():
        h = k.forward(z.detach())
        torch.testing.assert_close(h, y.detach(), rtol=rtol, atol=rtol)
        torch.testing.assert_close(k.backward(dh, z.detach(), h), g, rtol=rtol, atol=rtol)
        if k.fast is not None and dtype == torch.float32:
            fast = k.fast(z.detach() * k.fast_scale)
            torch.testing.assert_close(fast, y.detach(), rtol=0.0, atol=4e-7)
    assert ENGINE.get(name).forward is k.forward
    assert type(ENGINE.get(name).module()) is type(activation(name)())


@pytest.mark.parametrize("name", WITH_SATURATION)
def test_saturation_face_is_phi_prime_from_autograd(name: str) -> None:
    """|phi'| from the output (or input) equals autograd's |phi'|, rtol 1e-10; dmax is its max."""
    s = activation(name).saturation
    assert s is not None
    z = torch.linspace(-6.0, 6.0, 2001, dtype=torch.float64).requires_grad_(True)
    y = activation(name)().double()(z)
    (g,) = torch.autograd.grad(y.sum(), z)
    d = s.derivative(y.detach() if s.uses_output else z.detach())
    torch.testing.assert_close(d, g.abs(), rtol=1e-10, atol=1e-12)
    assert float(g.abs().max()) == pytest.approx(s.dmax, rel=1e-5)


def test_aliases_resolve_everywhere() -> None:
    assert ACTIVATIONS.aliases() == {"identity": "linear", "lrelu": "leaky_relu", "swish": "silu"}
    assert activation("Swish").name == "silu" and theory_activation("swish").name == "silu"
    assert ENGINE.get("identity").name == "linear" and isinstance(REMEDIES.build("swish"), nn.SiLU)
    assert ACTIVATIONS.defaults("lrelu") == {"negative_slope": 0.01}


@pytest.mark.parametrize("table", [ACTIVATIONS, THEORY, ENGINE, REMEDIES])
def test_unknown_name_names_the_value_and_the_choices(table) -> None:
    with pytest.raises(ValueError, match=r"unknown activation 'sigmiod'; did you mean 'sigmoid'\? "
                                         r"valid choices: .*tanh"):
        table.get("sigmiod")


def test_a_subclass_and_a_hugging_face_name_find_their_kind() -> None:
    class MyTanh(nn.Tanh):
        pass

    NewGELUActivation = type("NewGELUActivation", (nn.Module,), {})
    assert activation_kind(MyTanh()) == "tanh" and activation_kind(nn.ReLU6()) == "relu6"
    assert activation_kind(NewGELUActivation()) == "gelu" and activation_kind(nn.Linear(1, 1)) is None


WITH_THRESHOLD = [n for n in WITH_SATURATION if activation(n).saturation.output_threshold]
WITH_FUNCTIONS = [n for n in NAMES if activation(n).functions]


@pytest.mark.parametrize("name", WITH_THRESHOLD)
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3])
def test_output_threshold_selects_the_same_units_as_the_derivative(name: str, ratio: float) -> None:
    s = activation(name).saturation
    z = torch.linspace(-8.0, 8.0, 4001, dtype=torch.float64)
    h = activation(name)().double()(z)
    center, c = s.output_threshold(ratio)
    d = s.derivative(h)
    by_derivative = d < ratio * s.dmax
    margin = (d - ratio * s.dmax).abs() > 1e-9  # leave out points on the boundary itself
    assert torch.equal(((h - center).abs() > c)[margin], by_derivative[margin])
    lo, hi = activation(name).output_range
    assert lo <= float(h.min()) and float(h.max()) <= hi


@pytest.mark.parametrize("name", WITH_FUNCTIONS)
def test_functional_forms_compute_the_module(name: str) -> None:
    """Each functional form (in-place ones on a copy) equals the module's output exactly."""
    d = activation(name)
    want = d()(Z)
    for f in d.functions:
        torch.testing.assert_close(f(Z.clone()), want, rtol=0, atol=0)
    assert set(d.inplace) <= set(d.functions)
