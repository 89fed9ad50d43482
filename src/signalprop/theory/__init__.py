"""Mean-field theory of signal propagation, for any activation (NumPy/SciPy).

Quantities are named after the papers: the length map ``q_map`` and its fixed point ``q_star``,
the correlation map ``c_map`` / ``c_star``, ``chi_1`` and ``chi_c``, the depth scales ``xi_q``,
``xi_c``, ``xi_grad`` (Poole et al. 2016; Schoenholz et al. 2017), the edge of chaos
``critical_point`` / ``critical_line`` (raising :class:`NoCriticalPoint` with the reason when
there is none), the batch-norm gradient explosion rate ``bn_gradient_rate`` (Yang et al. 2019)
and the Jacobian spectrum moments ``jacobian_moments`` (Pennington et al. 2017).

The PyTorch bridge (``critical_``, ``measure_gradient_profile``, ...) lives in
:mod:`signalprop.theory.torch_adapter` and is re-exported here lazily, so ``import
signalprop.theory`` stays NumPy-only until it is used.

Example:
    >>> from signalprop import theory
    >>> cp = theory.critical_point("tanh", sigma_b2=0.05)
    >>> round(cp.sigma_w, 3), round(cp.q_star, 3)
    (1.327, 0.57)
"""

from __future__ import annotations

import importlib
from typing import Any

from signalprop.theory import meanfield
from signalprop.theory.activations import (
    ACTIVATIONS,
    Activation,
    activation_names,
    get_activation,
)
from signalprop.theory.batchnorm import bn_gradient_rate, bn_gradient_rate_mc
from signalprop.theory.closed_forms import bn_gradient_rate_linear, bn_gradient_rate_relu
from signalprop.theory.isometry import derivative_moments, jacobian_moments
from signalprop.theory.meanfield import *  # noqa: F403  (the maps and the edge of chaos)
from signalprop.theory.quadrature import (
    QuadratureWarning,
    bivariate_gaussian_expectation,
    gaussian_expectation,
    gaussian_expectations,
)

_TORCH = {
    "critical_",
    "mean_field_init_",
    "measure_gradient_profile",
    "limit_input_variance",
    "GradientProfile",
    "build_mlp",
    "jacobian_sq_singular_values",
    "resolve_activation",
    "torch_activation",
}

__all__ = [
    "ACTIVATIONS", "Activation", "QuadratureWarning", "activation_names",
    "bivariate_gaussian_expectation", "bn_gradient_rate", "bn_gradient_rate_linear",
    "bn_gradient_rate_mc", "bn_gradient_rate_relu", "derivative_moments", "gaussian_expectation",
    "gaussian_expectations", "get_activation", "jacobian_moments",
]
__all__ += meanfield.__all__
__all__ += sorted(_TORCH)


def __getattr__(name: str) -> Any:
    if name in _TORCH:
        value = getattr(importlib.import_module("signalprop.theory.torch_adapter"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'signalprop.theory' has no attribute {name!r}")
