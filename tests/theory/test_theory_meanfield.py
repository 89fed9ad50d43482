"""Mean-field maps and critical points against closed forms and direct iteration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from signalprop import theory
from signalprop.theory import (
    NoCriticalPoint,
    activation_names,
    c_map,
    c_star,
    chi_1,
    chi_c,
    critical_line,
    critical_point,
    get_activation,
    q_map,
    q_map_slope,
    q_star,
    xi_c,
    xi_grad,
    xi_q,
)
from signalprop.theory import closed_forms as cf

# --------------------------------------------------------------------------- maps


@settings(max_examples=25, deadline=None)
@given(q=st.floats(1e-3, 1e3), sw2=st.floats(0.1, 5.0), sb2=st.floats(0.0, 1.0))
def test_q_map_closed_forms(q: float, sw2: float, sb2: float) -> None:
    for name in ("relu", "erf", "gaussian", "linear"):
        p2, _ = cf.MOMENTS[name](q)
        assert float(q_map(name, q, sw2, sb2)) == pytest.approx(sw2 * float(p2) + sb2, rel=1e-9)


def test_q_map_slope_matches_finite_difference() -> None:
    for name in ("tanh", "sigmoid", "elu", "gaussian"):
        for q in (0.1, 1.0, 10.0):
            h = 1e-5 * q
            fd = (q_map(name, q + h, 1.7, 0.1) - q_map(name, q - h, 1.7, 0.1)) / (2 * h)
            assert float(q_map_slope(name, q, 1.7, 0.1)) == pytest.approx(float(fd), rel=1e-6)


def test_q_star_against_iteration_and_closed_forms() -> None:
    # direct iteration of the map (an independent, slow reference)
    for name, sw2, sb2 in [("tanh", 2.0, 0.1), ("sigmoid", 4.0, 0.0), ("erf", 1.5, 0.3),
                           ("gaussian", 3.0, 0.05)]:
        q = 1.0
        for _ in range(400):  # every map here contracts (slope < 0.7): converged long before
            q = float(q_map(name, q, sw2, sb2))
        assert q_star(name, sw2, sb2) == pytest.approx(q, rel=1e-8)
    # relu: q* = sb2 / (1 - sw2/2) for sw2 < 2; 0 for sb2 = 0; diverges for sw2 > 2
    assert q_star("relu", 1.5, 0.2) == pytest.approx(0.2 / (1 - 0.75), rel=1e-9)
    assert q_star("relu", 1.5, 0.0) == 0.0
    assert math.isinf(q_star("relu", 2.5, 0.0))
    # tanh at sigma_w = 1, sigma_b = 0: q^l ~ 1/(2l) decays to the limit q* = 0
    assert q_star("tanh", 1.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="sigma_w2"):
        q_star("tanh", -1.0)


def test_chi_1_closed_forms() -> None:
    assert chi_1("relu", 2.0, 0.0, q=3.7) == pytest.approx(1.0, abs=1e-12)
    assert chi_1("relu", 1.0, 0.0, q=1.0) == pytest.approx(0.5, abs=1e-12)
    for q in (0.1, 1.0, 10.0):
        _, d2 = cf.erf_moments(q)
        assert chi_1("erf", 1.3, 0.0, q=q) == pytest.approx(1.3 * float(d2), rel=1e-10)
    # leaky relu with hyper-parameter: (1 + a^2)/2 sigma_w^2
    act = get_activation("leaky_relu", negative_slope=0.2)
    assert chi_1(act, 2.0, 0.0, q=1.0) == pytest.approx(1.04, rel=1e-12)


def test_c_map_closed_forms_and_fixed_points() -> None:
    c = np.linspace(-0.9, 0.99, 7)
    q = q_star("erf", 2.0, 0.1)
    np.testing.assert_allclose(c_map("erf", c, 2.0, 0.1), cf.erf_c_map(c, 2.0, 0.1, q),
                               rtol=1e-8)
    np.testing.assert_allclose(c_map("relu", c, 1.5, 0.1), cf.relu_c_map(c, 1.5, 0.1,
                                                                        q_star("relu", 1.5, 0.1)),
                               rtol=1e-8)
    assert chi_c("erf", 2.0, 0.1, c=0.3) == pytest.approx(
        float(cf.erf_chi_c(0.3, 2.0, q)), rel=1e-8)
    assert chi_c("relu", 1.5, 0.1, c=0.3) == pytest.approx(float(cf.relu_chi_c(0.3, 1.5)),
                                                          rel=1e-8)
    # c-map(1) = 1 always
    assert float(c_map("tanh", 1.0, 2.0, 0.1)) == pytest.approx(1.0, rel=1e-9)
    # ordered phase: c* = 1 and chi_c = chi_1 < 1
    assert c_star("tanh", 0.8, 0.1) == 1.0
    assert chi_c("tanh", 0.8, 0.1) == pytest.approx(chi_1("tanh", 0.8, 0.1))
    # chaotic odd activation at sigma_b = 0: c* = 0 (Poole et al. 2016)
    assert c_star("tanh", 4.0, 0.0) == pytest.approx(0.0, abs=1e-8)
    # chaotic with bias: 0 < c* < 1, a fixed point of the map with slope chi_c < 1
    cs = c_star("tanh", 4.0, 0.3)
    assert 0.0 < cs < 1.0
    assert float(c_map("tanh", cs, 4.0, 0.3)) == pytest.approx(cs, abs=1e-8)
    assert chi_c("tanh", 4.0, 0.3) < 1.0 < chi_1("tanh", 4.0, 0.3)


def test_depth_scales() -> None:
    # ordered: gradients vanish (xi_grad > 0), chaotic: explode (xi_grad < 0)
    assert xi_grad("tanh", 0.8, 0.05) > 0
    assert xi_grad("tanh", 3.0, 0.05) < 0
    assert xi_grad("tanh", 3.0, 0.05) == pytest.approx(-1 / math.log(chi_1("tanh", 3.0, 0.05)))
    # xi_c peaks at the critical point (Schoenholz et al. 2017, Fig. 1)
    sw2 = critical_point("tanh", 0.05).sigma_w2
    near, far = xi_c("tanh", sw2 * 1.02, 0.05), xi_c("tanh", sw2 * 1.5, 0.05)
    assert near > 10 * far > 0
    assert xi_q("tanh", sw2, 0.05) == pytest.approx(
        -1 / math.log(float(q_map_slope("tanh", q_star("tanh", sw2, 0.05), sw2, 0.05))))


# --------------------------------------------------------------------------- critical points


def test_known_critical_points() -> None:
    relu = critical_point("relu")
    assert relu.sigma_w == pytest.approx(math.sqrt(2), rel=1e-12)
    assert relu.kind == "marginal" and math.isnan(relu.q_star)
    tanh0 = critical_point("tanh")
    assert tanh0.sigma_w == pytest.approx(1.0, abs=1e-6) and tanh0.q_star == 0.0
    # Schoenholz et al. 2017 (Fig. 1): tanh, sigma_b^2 = 0.05 -> sigma_w ~= 1.327
    t = critical_point("tanh", 0.05)
    assert t.sigma_w == pytest.approx(1.327, abs=5e-4)
    assert t.chi_1 == pytest.approx(1.0, abs=1e-9)
    assert chi_1("tanh", t.sigma_w2, 0.05) == pytest.approx(1.0, abs=1e-7)  # independent path
    assert q_star("tanh", t.sigma_w2, 0.05) == pytest.approx(t.q_star, rel=1e-7)
    assert 0 < t.q_slope < 1


@pytest.mark.parametrize("name", ["relu", "linear", "tanh", "erf", "sin", "hardtanh",
                                  "softsign", "elu", "selu", "gaussian"])
def test_zero_bias_critical_points_closed_form(name: str) -> None:
    cp = critical_point(name, 0.0)
    assert cp.sigma_w2 == pytest.approx(cf.critical_sigma_w2_at_zero_bias(name), rel=1e-6)


def test_leaky_relu_hyperparameter() -> None:
    cp = critical_point(get_activation("leaky_relu", negative_slope=0.3))
    assert cp.sigma_w2 == pytest.approx(2 / 1.09, rel=1e-12)


@pytest.mark.parametrize("name", ["erf", "sin", "hardtanh", "gaussian"])
@pytest.mark.parametrize("sb2", [0.05, 0.3, 1.0])
def test_critical_line_against_closed_form_moments(name: str, sb2: float) -> None:
    sw2, q = cf.critical_point_from_moments(name, sb2)
    cp = critical_point(name, sb2)
    assert cp.sigma_w2 == pytest.approx(sw2, rel=1e-8)
    assert cp.q_star == pytest.approx(q, rel=1e-7)
    if name == "gaussian":
        sw2g, qg = cf.gaussian_critical_point(sb2)
        assert cp.sigma_w2 == pytest.approx(sw2g, rel=1e-8)
        assert cp.q_star == pytest.approx(qg, rel=1e-8)


def test_gaussian_activation_exact_point() -> None:
    # exp(-x^2/2) at sigma_b = 0: q* = sigma_w = 1 + sqrt(2)
    cp = critical_point("gaussian")
    assert cp.sigma_w == pytest.approx(1 + math.sqrt(2), rel=1e-9)
    assert cp.q_star == pytest.approx(1 + math.sqrt(2), rel=1e-9)
    assert cp.q_slope == pytest.approx(-1 / (1 + math.sqrt(2)), rel=1e-7)  # stable, oscillating


def test_sigmoid_has_a_finite_critical_point_at_zero_bias() -> None:
    # not assumed: phi(0) = 1/2, chi_1 goes from 0 (q -> 0) to infinity (q -> inf) along the
    # fixed-point curve, crossing 1 once at a stable q*
    cp = critical_point("sigmoid", 0.0)
    assert cp.kind == "fixed-point"
    assert 10.0 < cp.sigma_w < 10.3 and 40 < cp.q_star < 50
    assert q_star("sigmoid", cp.sigma_w2, 0.0) == pytest.approx(cp.q_star, rel=1e-7)
    assert chi_1("sigmoid", cp.sigma_w2, 0.0) == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize(
    "name,sb2,phrase",
    [
        ("softplus", 0.0, "only as q* -> infinity"),
        ("softplus", 0.3, "only as q* -> infinity"),
        ("relu", 0.05, "only as q* -> infinity"),
        ("linear", 0.05, "only as q* -> infinity"),
        ("leaky_relu", 0.05, "only as q* -> infinity"),
        ("gelu", 0.0, "unstable"),
        ("silu", 0.0, "unstable"),
        ("gelu", 0.05, "unstable fixed points"),
        ("silu", 0.3, "unstable fixed points"),
    ],
)
def test_no_critical_point_with_reason(name: str, sb2: float, phrase: str) -> None:
    with pytest.raises(NoCriticalPoint, match="no critical point") as ei:
        critical_point(name, sb2)
    assert isinstance(ei.value, ValueError)
    assert phrase in ei.value.reason
    assert ei.value.activation == name and ei.value.sigma_b2 == sb2


def test_no_critical_point_reasons_hold_independently() -> None:
    # softplus: along sigma_w, the q* reached from q0 = 1 has chi_1 < 1 wherever q* is finite
    for sw in (0.8, 1.2, 1.35, 1.4, 1.414):
        q = q_star("softplus", sw * sw, 0.0)
        assert math.isfinite(q)
        assert chi_1("softplus", sw * sw, 0.0, q) < 1.0
    assert math.isinf(q_star("softplus", 1.42**2, 0.0))  # past sigma_w^2 = 2 it diverges
    # relu with bias: chi_1 = 1 - sigma_b^2 / q* < 1 (closed form)
    for sw2 in (1.0, 1.9, 1.99):
        q = q_star("relu", sw2, 0.1)
        assert chi_1("relu", sw2, 0.1) == pytest.approx(1 - 0.1 / q, rel=1e-9)
    # gelu at sigma_b = 0: the fixed point at q = 1 (sigma_w^2 = 1 / E[gelu^2](1)) is unstable
    sw2 = 1.0 / float(q_map("gelu", 1.0, 1.0))
    assert float(q_map_slope("gelu", 1.0, sw2)) > 1.0
    assert chi_1("gelu", sw2, 0.0, q=1.0) > 1.0


def test_every_registered_activation_is_decided() -> None:
    # a number or a reasoned NoCriticalPoint, at two bias variances
    for name in activation_names():
        for sb2 in (0.0, 0.05):
            try:
                cp = critical_point(name, sb2)
            except NoCriticalPoint as e:
                assert len(e.reason) > 40
                continue
            assert cp.chi_1 == pytest.approx(1.0, abs=1e-7)
            assert cp.sigma_w > 0


def test_critical_line() -> None:
    line = critical_line("tanh", [0.0, 0.05, 0.3])
    assert line.sigma_w[1] == pytest.approx(1.327, abs=5e-4)
    assert np.all(np.diff(line.sigma_w) > 0)  # more bias needs larger weights
    assert all(r is None for r in line.reasons)
    relu = critical_line("relu", [0.0, 0.1])
    assert relu.sigma_w[0] == pytest.approx(math.sqrt(2)) and math.isnan(relu.sigma_w[1])
    assert relu.reasons[0] is None and "infinity" in relu.reasons[1]


def test_callables_match_registered_names() -> None:
    ref = critical_point("tanh", 0.05)
    for fn in (torch.tanh, torch.nn.Tanh(), np.tanh, lambda x: np.tanh(x)):
        cp = critical_point(fn, 0.05)
        assert cp.sigma_w == pytest.approx(ref.sigma_w, rel=1e-7)
    act = get_activation(torch.tanh)
    assert act.derivative == "autograd"
    x = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(act.dphi(x), 1 / np.cosh(x) ** 2, rtol=1e-12)
    fd = get_activation(np.tanh)
    assert fd.derivative == "finite-difference"
    np.testing.assert_allclose(fd.dphi(x), 1 / np.cosh(x) ** 2, rtol=1e-8, atol=1e-10)
    # finite-difference noise (~1e-10) must not fake a crossing where chi_1 - 1 = O(q^2)
    cp0 = critical_point(fd, 0.0)
    assert cp0.kind == "limit q*->0" and cp0.sigma_w == pytest.approx(1.0, abs=1e-6)


def test_custom_activation_without_a_name() -> None:
    # ISRU x / sqrt(1 + x^2): odd, phi'(0) = 1 -> the limit sigma_w = 1 at sigma_b = 0
    isru = lambda x: x * torch.rsqrt(1 + x * x)  # noqa: E731
    cp = critical_point(isru, 0.0)
    assert cp.kind == "limit q*->0" and cp.sigma_w == pytest.approx(1.0, rel=1e-6)
    cp = critical_point(isru, 0.1)
    assert chi_1(isru, cp.sigma_w2, 0.1) == pytest.approx(1.0, abs=1e-7)


def test_bad_activation_specs() -> None:
    with pytest.raises(ValueError, match="valid choices"):
        critical_point("sigmiod")
    with pytest.raises(TypeError):
        get_activation(3.0)
    with pytest.raises(ValueError, match="element-wise"):
        get_activation(lambda x: np.sum(x))
    with pytest.raises(ValueError, match="sigma_b2"):
        critical_point("tanh", -0.1)
    with pytest.raises(ValueError, match="hyper-parameters"):
        get_activation(np.tanh, alpha=1.0)


def test_public_api_is_complete() -> None:
    for name in theory.__all__:
        assert getattr(theory, name) is not None
