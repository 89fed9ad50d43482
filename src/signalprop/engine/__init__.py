"""Batched population training: K same-shaped MLPs with stacked weights, trained in one pass.

- :class:`Arch`: the shared architecture; :class:`Population`: the members, their batched
  optimiser, probes and divergence handling; :class:`FitResult`.
- :class:`MLP`: one member as a plain ``nn.Module`` (the reference it is tested against).
- :data:`ACTIVATIONS`, :data:`OPTIMIZERS`: the registries of names the engine understands.
"""

from signalprop.engine.activations import ACTIVATIONS, Activation, get_activation
from signalprop.engine.optim import OPTIMIZERS, BatchedOptimizer, make_optimizer
from signalprop.engine.population import (
    CLIPS,
    INITS,
    Arch,
    BatchSampler,
    FitResult,
    Population,
    member_batches,
)
from signalprop.engine.reference import MLP, NORM_POSITIONS, NORMS, fit_reference, torch_optimizer

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "Arch",
    "BatchSampler",
    "BatchedOptimizer",
    "CLIPS",
    "FitResult",
    "INITS",
    "MLP",
    "NORMS",
    "NORM_POSITIONS",
    "OPTIMIZERS",
    "Population",
    "fit_reference",
    "get_activation",
    "make_optimizer",
    "member_batches",
    "torch_optimizer",
]
