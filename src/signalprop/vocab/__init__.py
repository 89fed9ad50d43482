"""The package's vocabulary: one registry per concept, each name resolved in one place.

- :data:`ACTIVATIONS` (:mod:`signalprop.vocab.activations`): every face of an activation (NumPy
  phi and phi' for the theory, ``nn.Module``, the batched engine's kernel, the probe's saturation
  and dead-unit rules, default hyper-parameters).
- :data:`NORMS` (:mod:`signalprop.vocab.norms`): ``none``, ``batch``, ``layer``.

Canonical names are the ones the docs and the CLI use; the other spellings found in the package
are aliases (``"bn"`` -> ``"batch"``), so old configs keep working. Unknown names raise
``ValueError`` naming the value and the valid choices. The older tables (``theory.ACTIVATIONS``,
``engine.ACTIVATIONS``, ``remedies.ACTIVATIONS``, ``stats.SATURATING`` ...) are views of these.
This package depends on nothing in signalprop but :mod:`signalprop._registry`.
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
from signalprop.vocab.norms import NORMS, norm_module

__all__ = [
    "ACTIVATIONS", "NORMS", "ActivationDef", "Kernel", "Saturation", "activation",
    "activation_kind", "infer_activation", "norm_module",
]
