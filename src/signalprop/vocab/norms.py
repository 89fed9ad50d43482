"""The normalisation vocabulary: ``none``, ``batch`` and ``layer``, one entry each.

Canonical names are the sweep's and the engine's (docs/sweep.md): ``batch`` and ``layer``. The
other spellings the package used are aliases resolved here: ``bn``/``batchnorm`` and
``ln``/``layernorm`` (the lab's studies and :func:`signalprop.remedies.transforms.insert_norm`).

Each entry's face is a module factory ``(shape, affine=True, eps=1e-5, momentum=0.1)``
(:func:`norm_module`): ``shape`` is the feature shape without the batch dimension, dim 0 the
channels. Batch norm picks BatchNorm1d/2d/3d by the shape; layer norm is ``LayerNorm`` on [B, F]
and ``GroupNorm(1, C)`` on conv maps (per-channel gains; the spatial size is not fixed).
The batched engine implements all three itself (:mod:`signalprop.engine.batched_mlp`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from signalprop._registry import Registry

#: The module classes recognised as a normalisation layer (batch, sync-batch and instance norms
#: share ``_NormBase``; layer and group norm), by the probe and by the remedies.
NORM_CLASSES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,
)

#: Normalisation epsilon and batch-norm running-average momentum (torch's defaults).
NORM_EPS = 1e-5
BN_MOMENTUM = 0.1


def _none(shape: Sequence[int], affine: bool = True, eps: float = NORM_EPS,
          momentum: float = BN_MOMENTUM) -> nn.Module:
    return nn.Identity()


def _batch(shape: Sequence[int], affine: bool = True, eps: float = NORM_EPS,
           momentum: float = BN_MOMENTUM) -> nn.Module:
    if len(shape) == 0:
        raise ValueError("cannot normalise a scalar output (shape [B])")
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}.get(len(shape))
    if cls is None:
        raise ValueError(f"no batch norm for feature shape {tuple(shape)}")
    return cls(shape[0], eps=eps, momentum=momentum, affine=affine)


def _layer(shape: Sequence[int], affine: bool = True, eps: float = NORM_EPS,
           momentum: float = BN_MOMENTUM) -> nn.Module:
    if len(shape) == 0:
        raise ValueError("cannot normalise a scalar output (shape [B])")
    if len(shape) == 1:
        return nn.LayerNorm(shape[0], eps=eps, elementwise_affine=affine)
    return nn.GroupNorm(1, shape[0], eps=eps, affine=affine)


NORMS: Registry[Callable[..., nn.Module]] = Registry("norm")
NORMS.register("none", _none, doc="no normalisation")
NORMS.register("batch", _batch, eps=NORM_EPS, momentum=BN_MOMENTUM,
               doc="batch norm (Ioffe & Szegedy 2015)")
NORMS.register("layer", _layer, eps=NORM_EPS, doc="layer norm (Ba, Kiros & Hinton 2016)")
for _alias, _name in (("bn", "batch"), ("batchnorm", "batch"), ("ln", "layer"),
                      ("layernorm", "layer")):
    NORMS.alias(_alias, _name)


def norm_module(name: str, shape: int | Sequence[int], affine: bool = True, **overrides: float) -> nn.Module:
    """The norm ``name`` (or an alias) for features of ``shape`` (an int: [B, shape]).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or an unusable shape.
    """
    e = NORMS.entry(name)
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    return e.fn(dims, affine, **{**e.defaults, **overrides})
