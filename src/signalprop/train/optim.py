"""Optimisers for the loop: a registered name, a factory or instances, and a readable name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from signalprop.vocab.optimizers import optimizer

OptimizerSpec = str | torch.optim.Optimizer | Callable[..., torch.optim.Optimizer]


def make_optimizer(
    spec: OptimizerSpec, model: nn.Module, lr: float, **kwargs: Any
) -> torch.optim.Optimizer:
    """Build an optimiser from a registered name, a factory ``f(params, lr=...)`` or pass through
    an existing instance (which must own ``model``'s parameters)."""
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    if isinstance(spec, str):
        # the vocabulary's torch face, with its registered defaults; some optimisers take the
        # model (layer-wise rates), the others its trainable parameters
        d = optimizer(spec)
        return d.build(model if d.takes_model else _trainable(model), lr, **kwargs)
    if callable(spec):
        return spec(_trainable(model), lr=lr, **kwargs)
    raise TypeError(
        f"optimizer must be a name, a torch.optim.Optimizer or a factory, got {type(spec).__name__}"
    )


def make_optimizers(
    spec: OptimizerSpec | Sequence[torch.optim.Optimizer], model: nn.Module, lr: float,
    **kwargs: Any,
) -> list[torch.optim.Optimizer]:
    """:func:`make_optimizer`, or a list of optimiser instances used together (each steps its own
    parameters every step)."""
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(o, torch.optim.Optimizer) for o in spec):
            raise TypeError("a list of optimizers must hold torch.optim.Optimizer instances")
        return list(spec)
    return [make_optimizer(spec, model, lr, **kwargs)]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_name(spec: Any) -> str:
    """A readable name for an optimiser spec (``"adam"``, ``"SGD"``, ``"SGD+Adam"``)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, (list, tuple)):
        return "+".join(optimizer_name(o) for o in spec)
    if isinstance(spec, torch.optim.Optimizer):
        return type(spec).__name__
    return getattr(spec, "__name__", type(spec).__name__)
