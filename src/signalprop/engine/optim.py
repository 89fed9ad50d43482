"""Batched optimisers over one flat parameter buffer: the engine face of the optimiser vocabulary.

The kernels live in :mod:`signalprop.vocab.batched_optim` (the update rules, which follow
``torch.optim`` exactly); their names and default hyper-parameters are registered once in
:data:`signalprop.vocab.optimizers.OPTIMIZERS`. :data:`OPTIMIZERS` here is the view of the
optimisers that have a kernel, with the defaults of the kernel's hyper-parameters.
"""

from __future__ import annotations

import torch

from signalprop._registry import Registry
from signalprop.vocab.batched_optim import (  # noqa: F401 (public names of this module)
    SGD,
    SMORMS3,
    Adam,
    BatchedOptimizer,
    Hyper,
    RMSProp,
    Rprop,
)
from signalprop.vocab.optimizers import OPTIMIZERS as VOCAB

OPTIMIZERS: Registry = VOCAB.derive(lambda e: e.fn.engine, defaults=lambda e: e.fn.engine_defaults())


def optimizer_defaults(name: str) -> dict[str, float]:
    """Default hyper-parameters of a batched optimiser (``ValueError`` for unknown names)."""
    return OPTIMIZERS.defaults(name)


def make_optimizer(
    name: str,
    p: torch.Tensor,
    hp: dict[str, Hyper],
    layout: tuple[int, list[tuple[int, int]]] | None = None,
) -> BatchedOptimizer:
    """Build the batched optimiser ``name`` over the flat buffer ``p`` (``layout``: see
    :class:`BatchedOptimizer`)."""
    cls = OPTIMIZERS.get(name)
    return cls(p, hp, layout)
