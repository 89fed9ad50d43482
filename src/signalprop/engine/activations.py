"""Activations with hand-written backward passes for the batched engine.

The engine does not use autograd on its hot path: each activation is a pair
``forward(z) -> h`` and ``backward(dh, z, h) -> dz`` where the backward is, wherever PyTorch has
one, the same fused ATen kernel autograd itself would call (``tanh_backward``,
``sigmoid_backward``, ``threshold_backward`` ...): one pass over memory instead of two or three.
Each entry also names the ``nn.Module`` that computes the same function, used by
:class:`signalprop.engine.MLP` (the single-model reference) so the two can be compared exactly.

:data:`ACTIVATIONS` is a view of the activation vocabulary (:mod:`signalprop.vocab.activations`):
the entries that have a kernel face, at their default hyper-parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from signalprop._registry import Entry, Registry
from signalprop.vocab.activations import ACTIVATIONS as VOCAB
from signalprop.vocab.activations import (  # noqa: F401 (public names of this module)
    LEAKY_SLOPE,
    SELU_ALPHA,
    SELU_SCALE,
    Gaussian,
    _tanh_from_2z_,
)

#: nn.Softsign (the name this module exported before the vocabulary).
Softsign = nn.Softsign


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


def _engine_face(e: Entry[Any]) -> Activation | None:
    d, k = e.fn, e.fn.kernel
    if k is None:
        return None
    # the kernel is written for the default hyper-parameters: the module is built with them too
    return Activation(d.name, k.forward, k.backward, d, k.fast, k.fast_scale)


ACTIVATIONS: Registry = VOCAB.derive(_engine_face)


def get_activation(name: str) -> Activation:
    """The :class:`Activation` registered as ``name`` (``ValueError`` listing valid names)."""
    return ACTIVATIONS.get(name)
