"""Activations with hand-written backward passes for the batched engine.

The engine does not use autograd on its hot path: each activation is a pair
``forward(z) -> h`` and ``backward(dh, z, h) -> dz`` where the backward is, wherever PyTorch has
one, the same fused ATen kernel autograd itself would call (``tanh_backward``,
``sigmoid_backward``, ``threshold_backward`` ...): one pass over memory instead of two or three.
Each entry also names the ``nn.Module`` that computes the same function, used by
:class:`signalprop.engine.MLP` (the single-model reference) so the two can be compared exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from signalprop._registry import Registry

aten = torch.ops.aten

#: SELU constants (Klambauer et al. 2017); also the LeCun-init activation of references.md.
SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805
LEAKY_SLOPE = 0.01


class Gaussian(nn.Module):
    """phi(z) = exp(-z^2 / 2), the Gaussian bump non-linearity."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * z * z)


class Softsign(nn.Softsign):
    """nn.Softsign (re-exported so every entry names a module class)."""


@dataclass(frozen=True)
class Activation:
    """A batched activation.

    Attributes:
        name: Registry name (also the ``kind`` used by :mod:`signalprop.stats`).
        forward: ``z -> h`` (any shape).
        backward: ``(dh, z, h) -> dz`` with dz = dh * phi'(z).
        module: Factory of the equivalent ``nn.Module``.
        fast: Optional faster float32 form ``fast(s * z) == phi(z)``, applied in place to its
            argument (the engine folds the factor s = ``fast_scale`` into the matmul that
            produces z, for free).
        fast_scale: The factor s.
    """

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    module: Callable[[], nn.Module]
    fast: Callable[[torch.Tensor], torch.Tensor] | None = None
    fast_scale: float = 1.0


ACTIVATIONS: Registry = Registry("activation")


def _reg(name: str, fwd, bwd, module, fast=None, fast_scale=1.0) -> None:  # noqa: ANN001
    ACTIVATIONS.register(name, Activation(name, fwd, bwd, module, fast, fast_scale))


def _tanh_from_2z_(t: torch.Tensor) -> torch.Tensor:
    """tanh(z) = 2 sigmoid(2z) - 1, in place on t = 2z.

    On CPU torch's sigmoid is ~2-3x cheaper than its tanh (measured: 129 vs 341 us on a
    [32, 64, 64] float32 tensor, one thread), and tanh is the costliest op of a small tanh MLP's
    step after the matmuls. Absolute error <= 1.8e-7 in float32 (torch.tanh: 3e-8); used for
    float32 only.
    """
    return t.sigmoid_().mul_(2.0).sub_(1.0)


_reg("linear", lambda z: z, lambda dh, z, h: dh, nn.Identity)
_reg("tanh", torch.tanh, lambda dh, z, h: aten.tanh_backward(dh, h), nn.Tanh, _tanh_from_2z_, 2.0)
_reg("sigmoid", torch.sigmoid, lambda dh, z, h: aten.sigmoid_backward(dh, h), nn.Sigmoid)
_reg("relu", torch.relu, lambda dh, z, h: aten.threshold_backward(dh, h, 0), nn.ReLU)
_reg(
    "leaky_relu",
    lambda z: torch.nn.functional.leaky_relu(z, LEAKY_SLOPE),
    lambda dh, z, h: aten.leaky_relu_backward(dh, z, LEAKY_SLOPE, False),
    lambda: nn.LeakyReLU(LEAKY_SLOPE),
)
_reg(
    "elu",
    torch.nn.functional.elu,
    lambda dh, z, h: aten.elu_backward(dh, 1.0, 1.0, 1.0, True, h),
    nn.ELU,
)
_reg(
    "selu",
    torch.selu,
    lambda dh, z, h: aten.elu_backward(dh, SELU_ALPHA, SELU_SCALE, 1.0, True, h),
    nn.SELU,
)
_reg(
    "gelu",
    torch.nn.functional.gelu,
    lambda dh, z, h: aten.gelu_backward(dh, z),
    nn.GELU,
)
_reg(
    "softplus",
    torch.nn.functional.softplus,
    lambda dh, z, h: aten.softplus_backward(dh, z, 1.0, 20.0),
    nn.Softplus,
)
# softsign h = z/(1+|z|): phi'(z) = 1/(1+|z|)^2 = (1-|h|)^2
_reg(
    "softsign",
    torch.nn.functional.softsign,
    lambda dh, z, h: dh * (1 - h.abs()).square(),
    Softsign,
)
# gaussian h = exp(-z^2/2): phi'(z) = -z h
_reg(
    "gaussian",
    lambda z: torch.exp(-0.5 * z * z),
    lambda dh, z, h: -(dh * z * h),
    Gaussian,
)
_reg("silu", torch.nn.functional.silu, lambda dh, z, h: aten.silu_backward(dh, z), nn.SiLU)
_reg(
    "hardtanh",
    torch.nn.functional.hardtanh,
    lambda dh, z, h: aten.hardtanh_backward(dh, z, -1.0, 1.0),
    nn.Hardtanh,
)
_reg(
    "relu6",
    torch.nn.functional.relu6,
    lambda dh, z, h: aten.hardtanh_backward(dh, z, 0.0, 6.0),
    nn.ReLU6,
)


def get_activation(name: str) -> Activation:
    """The :class:`Activation` registered as ``name`` (``ValueError`` listing valid names)."""
    return ACTIVATIONS.get(name)
