"""Gaussian expectations against closed forms and an independent adaptive quadrature."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, special

from signalprop.theory import (
    bivariate_gaussian_expectation,
    gaussian_expectation,
    gaussian_expectations,
    get_activation,
)
from signalprop.theory import closed_forms as cf

QS = np.array([0.0, 1e-6, 1e-2, 0.3, 1.0, 4.0, 30.0, 1e3, 1e5])


def quad_x(f, q: float) -> float:
    """Independent reference: SciPy's adaptive quad in x-space, x ~ N(0, q), with breakpoints."""
    s = math.sqrt(q)
    lim = 13.0 * s
    pts = sorted({p for p in (0.0, -1.0, 1.0, -3.0, 3.0, -s, s) if -lim < p < lim})
    return integrate.quad(
        lambda x: float(f(np.array(x))) * math.exp(-x * x / (2 * q)) / math.sqrt(2 * math.pi * q),
        -lim, lim, points=pts, limit=500, epsabs=1e-15, epsrel=1e-12,
    )[0]


@pytest.mark.parametrize("name", sorted(cf.MOMENTS))
def test_moments_match_closed_forms(name: str) -> None:
    act = get_activation(name)
    q = QS[QS > 0]
    e = gaussian_expectations(lambda x: np.stack([act.phi(x) ** 2, act.dphi(x) ** 2]), q,
                              kinks=act.kinks)
    p2, d2 = cf.MOMENTS[name](q)
    np.testing.assert_allclose(e[0], p2, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(e[1], d2, rtol=1e-9, atol=1e-14)


def test_sharply_peaked_sigmoid_derivative() -> None:
    # E[sigmoid'(x)^2] at large q: the integrand is a spike of width ~1/sqrt(q) in z; both
    # Gauss-Hermite rules miss it (they would agree on ~0), the fallback must not.
    act = get_activation("sigmoid")
    for q in (1e2, 1e4, 1e6):
        got = float(gaussian_expectation(lambda x: act.dphi(x) ** 2, q))
        ref = quad_x(lambda x: act.dphi(x) ** 2, q)
        assert got == pytest.approx(ref, rel=1e-8)
        # leading asymptotics: int sigma'^2 dx / sqrt(2 pi q) = (1/6) / sqrt(2 pi q)
        assert got == pytest.approx(1 / 6 / math.sqrt(2 * math.pi * q), rel=5 / q)
    # a plain 96-node Gauss-Hermite rule is visibly wrong there (the pitfall this guards against)
    x, w = np.polynomial.hermite_e.hermegauss(96)
    naive = float(np.sum(w * act.dphi(math.sqrt(1e4) * x) ** 2) / math.sqrt(2 * math.pi))
    assert abs(naive / quad_x(lambda t: act.dphi(t) ** 2, 1e4) - 1) > 0.5


@pytest.mark.parametrize("name", ["tanh", "elu", "selu", "gelu", "silu", "softplus", "softsign"])
def test_against_independent_quadrature(name: str) -> None:
    act = get_activation(name)
    for q in (1e-3, 0.5, 7.0, 300.0):
        for f in (lambda x: act.phi(x) ** 2, lambda x: act.dphi(x) ** 2):
            assert float(gaussian_expectation(f, q, kinks=act.kinks)) == pytest.approx(
                quad_x(f, q), rel=1e-8, abs=1e-14)


@settings(max_examples=30, deadline=None)
@given(q=st.floats(1e-4, 1e4), k=st.integers(0, 4))
def test_even_moments_property(q: float, k: int) -> None:
    # E[x^(2k)] = (2k-1)!! q^k, exact for Gauss-Hermite up to its degree
    got = float(gaussian_expectation(lambda x: x ** (2 * k), q))
    assert got == pytest.approx(special.factorial2(2 * k - 1) * q**k if k else 1.0, rel=1e-10)


def test_shapes_and_zero_variance() -> None:
    q = np.array([[0.0, 1.0], [2.0, 3.0]])
    out = gaussian_expectation(np.cos, q)
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, np.exp(-q / 2), rtol=1e-12)  # E cos(x) = e^{-q/2}
    assert gaussian_expectation(np.cos, 1.0).shape == ()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="q must be finite"):
        gaussian_expectation(np.sin, -1.0)
    with pytest.raises(ValueError, match="not finite"):
        with np.errstate(divide="ignore"):
            gaussian_expectation(lambda x: 1 / x, 1.0, order=3)  # a node at 0
    with pytest.raises(ValueError, match="element-wise"):
        gaussian_expectation(lambda x: x.sum(), 1.0)


@pytest.mark.parametrize("q", [0.2, 1.0, 3.0])
def test_bivariate_against_closed_forms(q: float) -> None:
    c = np.linspace(-0.95, 0.95, 9)
    relu = bivariate_gaussian_expectation(lambda a, b: np.maximum(a, 0) * np.maximum(b, 0),
                                          q, q, c)
    np.testing.assert_allclose(relu, q * cf.arccos_kernel(c) / 2, rtol=1e-10, atol=1e-14)
    erf = bivariate_gaussian_expectation(lambda a, b: special.erf(a) * special.erf(b), q, q, c)
    np.testing.assert_allclose(erf, (2 / math.pi) * np.arcsin(2 * q * c / (1 + 2 * q)),
                               atol=1e-9)
    with pytest.raises(ValueError, match="correlation"):
        bivariate_gaussian_expectation(lambda a, b: a * b, q, q, 1.5)


@pytest.mark.parametrize("name,q", [("sigmoid", 45.6), ("tanh", 0.5), ("hardtanh", 3.0),
                                    ("gelu", 2.0)])
def test_bivariate_limits_against_1d(name: str, q: float) -> None:
    # c = 1: E[phi(x)^2]; c = 0: E[phi(x)]^2; c = -1: E[phi(x) phi(-x)] (1-D expectations)
    act = get_activation(name)
    f = lambda a, b: act.phi(a) * act.phi(b)  # noqa: E731
    got = bivariate_gaussian_expectation(f, q, q, np.array([1.0, 0.0, -1.0]))
    e2 = float(gaussian_expectation(lambda x: act.phi(x) ** 2, q, kinks=act.kinks))
    e1 = float(gaussian_expectation(act.phi, q, kinks=act.kinks))
    em = float(gaussian_expectation(lambda x: act.phi(x) * act.phi(-x), q, kinks=act.kinks))
    # steep integrands (sigmoid at q ~ 46 varies on an angle ~1/(r sqrt(q)) next to the angular
    # cuts) and kinks off the origin (hardtanh at |x| = 1 crosses the polar panels obliquely) are
    # resolved to ~1e-5; smooth ones to ~1e-8
    rtol = {"sigmoid": 2e-5, "hardtanh": 1e-4}.get(name, 1e-7)
    np.testing.assert_allclose(got, [e2, e1 * e1, em], rtol=rtol, atol=1e-12)
