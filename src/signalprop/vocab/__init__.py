"""The package's vocabulary: one registry per concept, each name resolved in one place.

- :data:`ACTIVATIONS` (:mod:`signalprop.vocab.activations`): every face of an activation (NumPy
  phi and phi' for the theory, ``nn.Module``, the batched engine's kernel, the probe's saturation
  and dead-unit rules, default hyper-parameters).
- :data:`INITS` (:mod:`signalprop.vocab.inits`; public module :mod:`signalprop.init`): the
  in-place torch initialiser, the engine's Gaussian std where it has one.
- :data:`NORMS` (:mod:`signalprop.vocab.norms`): ``none``, ``batch``, ``layer``.
- :data:`OPTIMIZERS` (:mod:`signalprop.vocab.optimizers`): the torch optimiser, the batched
  engine's kernel where one exists, and one set of default hyper-parameters (``lr`` included).

Canonical names are the ones the docs and the CLI use; the other spellings found in the package
are aliases (``"bn"`` -> ``"batch"``), so old configs keep working. Unknown names raise
``ValueError`` naming the value and the valid choices. The older tables (``theory.ACTIVATIONS``,
``engine.ACTIVATIONS``, ``remedies.ACTIVATIONS``, ``stats.SATURATING`` ...) are views of these.
This package depends on nothing in signalprop but :mod:`signalprop._registry` (the optimiser
and initialisation implementations it registers live in it: :mod:`~signalprop.vocab.torch_optim`,
:mod:`~signalprop.vocab.batched_optim`, :mod:`~signalprop.vocab.inits`; the mean-field theory
behind ``critical`` is imported on first use).
"""

from __future__ import annotations

from signalprop.vocab.activations import (
    ACTIVATIONS,
    ActivationDef,
    Kernel,
    Saturation,
    activation,
    activation_kind,
    infer_activation,
)
from signalprop.vocab.inits import INITS, InitDef, init
from signalprop.vocab.norms import NORMS, norm_module
from signalprop.vocab.optimizers import OPTIMIZERS, OptimizerDef, optimizer

__all__ = [
    "ACTIVATIONS", "INITS", "NORMS", "OPTIMIZERS", "ActivationDef", "InitDef", "Kernel",
    "OptimizerDef", "Saturation", "activation", "init", "activation_kind", "infer_activation", "norm_module", "optimizer",
]
