"""Optimisers as the remedies see them: the torch face of the optimiser vocabulary.

- :class:`SMORMS3` (Simon Funk 2015, "RMSprop loses to SMORMS3 - Beware the Epsilon!").
- :class:`VSGD` (Schaul, Zhang & LeCun 2013, "No More Pesky Learning Rates"; finite-difference
  curvature from Schaul & LeCun 2013, "Adaptive learning rates and parallelization ...").
- :class:`LARS` (You, Gitman & Ginsburg 2017): a per-layer trust ratio ||w|| / ||g||.
- :func:`layerwise` : per-layer parameter groups whose learning rate is scaled by depth.

These live in :mod:`signalprop.vocab` (:mod:`~signalprop.vocab.torch_optim`,
:mod:`~signalprop.vocab.optimizers`), which registers every optimiser once. :data:`OPTIMIZERS`
here is its view: entries are called as ``fn(params, lr=lr, **defaults)`` with torch's argument
names (or ``fn(model, lr=...)`` when the factory has ``signalprop_takes_model = True``).
:data:`DEFAULT_LR` is each optimiser's registered learning rate, used by remedies that switch
optimiser (the user's SGD rate is rarely right for Adam).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from signalprop._registry import Registry
from signalprop.vocab.optimizers import OPTIMIZERS as VOCAB
from signalprop.vocab.optimizers import Params, layerwise, optimizer
from signalprop.vocab.torch_optim import LARS, SMORMS3, VSGD, depth_groups

__all__ = ["DEFAULT_LR", "LARS", "OPTIMIZERS", "SMORMS3", "VSGD", "depth_groups", "layerwise",
           "make_optimizer"]

#: name -> torch class or factory, with the defaults in torch's argument names (``lr`` apart).
OPTIMIZERS: Registry = VOCAB.derive(lambda e: e.fn.torch, defaults=lambda e: e.fn.torch_defaults())

#: name -> the registered default learning rate.
DEFAULT_LR: dict[str, float] = {n: VOCAB.get(n).lr for n in VOCAB}


def make_optimizer(
    name: str, model_or_params: nn.Module | Params, lr: float | None = None, **overrides: Any
) -> Optimizer:
    """Build the registered optimiser ``name`` (``lr`` defaults to :data:`DEFAULT_LR`)."""
    return optimizer(name).build(model_or_params, lr, **overrides)
