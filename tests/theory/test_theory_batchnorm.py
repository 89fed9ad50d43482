"""Batch-norm gradient explosion rate (Yang et al. 2019): closed forms, quadrature, Monte Carlo
and simulations of wide networks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from signalprop.theory import (
    bn_gradient_rate,
    bn_gradient_rate_linear,
    bn_gradient_rate_mc,
    bn_gradient_rate_relu,
    measure_gradient_profile,
)


@pytest.mark.parametrize("b", [4, 5, 8, 16, 64, 512])
def test_closed_forms_match_sphere_quadrature(b: int) -> None:
    assert bn_gradient_rate("relu", b, method="quadrature") == pytest.approx(
        bn_gradient_rate_relu(b), rel=1e-10)
    assert bn_gradient_rate("linear", b, method="quadrature") == pytest.approx(
        (b - 2) / (b - 3), rel=1e-10)


def test_relu_rate_limits() -> None:
    rates = [bn_gradient_rate_relu(b) for b in (4, 8, 32, 128, 1024, 10**6)]
    assert np.all(np.diff(rates) < 0)  # decreases with the batch size ...
    assert rates[-1] == pytest.approx(math.pi / (math.pi - 1), rel=1e-5)  # ... to pi/(pi-1)
    assert bn_gradient_rate_linear(8) == pytest.approx(1.2)


@pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid", "gelu", "sin"])
@pytest.mark.parametrize("b", [6, 32])
def test_quadrature_matches_monte_carlo(name: str, b: int) -> None:
    mc, se = bn_gradient_rate_mc(name, b, samples=60_000, seed=1)
    q = bn_gradient_rate(name, b, method="quadrature")
    assert abs(q - mc) < 4.5 * se + 1e-3


def test_every_nonlinear_activation_explodes() -> None:
    # Yang et al. 2019: BN itself causes the explosion, whatever phi (rate > 1); linear is the
    # mildest and tends to 1 with the batch size
    for name in ("relu", "tanh", "sigmoid", "elu", "selu", "gelu", "softplus", "erf"):
        assert bn_gradient_rate(name, 32) > bn_gradient_rate("linear", 32) > 1.0


def test_bad_batch_sizes() -> None:
    for b in (3, 2, 7.5):
        with pytest.raises(ValueError, match="batch_size"):
            bn_gradient_rate("relu", b)
    with pytest.raises(ValueError, match="closed-form"):
        bn_gradient_rate("tanh", 8, method="closed")
    with pytest.raises(ValueError, match="method"):
        bn_gradient_rate("relu", 8, method="magic")


# Simulation: depth-24 BN MLPs of width 512, batch sizes well below the width. The rate is the
# geometric mean of ||dL/dh^l||^2 / ||dL/dh^{l+1}||^2 over the middle layers (the first few are
# still converging to the BSB1 fixed point). Finite width and batch make the measured rate
# fluctuate by ~1-2% per seed at this size (largest of 6 seeds: 2.6%); the tolerance is 6%.
@pytest.mark.parametrize("name", ["relu", "linear"])
@pytest.mark.parametrize("b", [8, 16, 32])
def test_simulated_bn_networks_explode_at_the_predicted_rate(name: str, b: int) -> None:
    p = measure_gradient_profile(name, batch_norm=True, depth=24, width=512, batch_size=b,
                                 seed=b)
    assert p.predicted_rate == pytest.approx(bn_gradient_rate(name, b))
    assert p.measured_rate == pytest.approx(p.predicted_rate, rel=0.06)
    # and the explosion is real: the squared gradient at layer 1 is predicted^~20 times that at
    # the top
    assert p.grad_sq_norms[0] > p.grad_sq_norms[-1]


def test_simulated_bn_tanh_matches_quadrature() -> None:
    p = measure_gradient_profile("tanh", batch_norm=True, depth=24, width=512, batch_size=8,
                                 seed=3)
    assert p.measured_rate == pytest.approx(bn_gradient_rate("tanh", 8), rel=0.06)
