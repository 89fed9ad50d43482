"""The optimiser vocabulary: one entry per optimiser, with one set of default hyper-parameters.

Each :class:`OptimizerDef` (registered in :data:`OPTIMIZERS`) holds:

- ``defaults``: the default hyper-parameters, learning rate included, under the run config's flat
  names (``beta1``, ``eta_minus`` ...; docs/sweep.md). There is one default per optimiser: the
  remedies that switch optimiser, :func:`signalprop.train.make_optimizer`, the batched engine and
  the sweep's ``lr: null`` all read it here.
- ``torch``: the ``torch.optim`` class or factory (:mod:`signalprop.vocab.torch_optim` for those
  torch lacks), built by :meth:`OptimizerDef.build` with torch's argument names; ``torch_args``
  says which torch argument gathers which flat names (``betas = (beta1, beta2)``), and
  ``engine_only`` which flat names torch's version does not take.
- ``engine``: the batched kernel (:mod:`signalprop.vocab.batched_optim`) where one exists.

``momentum`` and ``nesterov`` are optimisers here (SGD whose momentum hyper-parameter defaults to
0.9), while for ``sgd``/``rmsprop`` ``momentum`` is a hyper-parameter (default 0): both spellings
were contracts before the vocabulary and stay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from signalprop._registry import Registry
from signalprop.vocab import batched_optim as B
from signalprop.vocab.torch_optim import LARS, SMORMS3, VSGD, depth_groups

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


@dataclass(frozen=True)
class OptimizerDef:
    """One optimiser and its faces (see the module docstring)."""

    name: str
    torch: Callable[..., Optimizer]
    doc: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    torch_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    engine_only: tuple[str, ...] = ()
    engine: type[B.BatchedOptimizer] | None = None
    takes_model: bool = False

    @property
    def lr(self) -> float:
        """The default learning rate."""
        return float(self.defaults["lr"])

    def torch_kwargs(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """Flat hyper-parameters -> keyword arguments of the torch face (``lr`` included)."""
        grouped = {k for ks in self.torch_args.values() for k in ks}
        out = {k: v for k, v in hparams.items() if k not in grouped and k not in self.engine_only}
        for arg, keys in self.torch_args.items():
            if all(k in hparams for k in keys):
                out[arg] = tuple(float(hparams[k]) for k in keys)
        return out

    def torch_defaults(self) -> dict[str, Any]:
        """The defaults as torch's keyword arguments, without ``lr``."""
        kw = self.torch_kwargs(self.defaults)
        kw.pop("lr", None)
        return kw

    def engine_defaults(self) -> dict[str, Any]:
        """The defaults of the batched kernel's hyper-parameters (``ValueError`` without one)."""
        if self.engine is None:
            raise ValueError(f"optimizer {self.name!r} has no batched-engine kernel")
        return {k: self.defaults[k] for k in self.engine.keys}

    def build(
        self, model_or_params: nn.Module | Params, lr: float | None = None, **overrides: Any
    ) -> Optimizer:
        """The torch optimiser over a model's parameters (or a parameter list / groups).

        ``overrides`` use torch's argument names (``betas=(0.9, 0.99)``); ``lr`` defaults to
        the registered one.
        """
        lr = self.lr if lr is None else lr
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"learning rate must be a positive number, got {lr}")
        kw = {**self.torch_defaults(), **overrides}
        if self.takes_model:
            if not isinstance(model_or_params, nn.Module):
                raise TypeError(f"optimizer {self.name!r} needs the model, not a parameter list")
            return self.torch(model_or_params, lr=lr, **kw)
        params = (
            model_or_params.parameters() if isinstance(model_or_params, nn.Module)
            else model_or_params
        )
        return self.torch(params, lr=lr, **kw)


def layerwise(
    model: nn.Module,
    lr: float = 0.1,
    base: str = "sgd",
    first_layer_factor: float = 10.0,
    **base_kwargs: Any,
) -> Optimizer:
    """Per-layer learning rates scaled geometrically with depth.

    Layer l of L (registration order, 0 = input side) gets
    lr_l = lr * first_layer_factor ** ((L - 1 - l) / (L - 1)): the first layer ``lr *
    first_layer_factor``, the last ``lr``. Factor > 1 counters gradients that vanish towards the
    input; < 1 counters ones that explode there.

    Args:
        model: The model (its parameters are grouped by owning module).
        lr: Rate of the last layer.
        base: Registered optimiser name used for the groups (not ``layerwise``/``lars``).
        first_layer_factor: Ratio of the first layer's rate to the last one's.
        **base_kwargs: Passed to the base optimiser.
    """
    if not first_layer_factor > 0:
        raise ValueError(f"first_layer_factor must be > 0, got {first_layer_factor}")
    d = OPTIMIZERS.get(base)
    if d.takes_model:
        raise ValueError(f"layerwise cannot use {d.name!r} as its base optimiser")
    groups = depth_groups(model)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    n = len(groups)
    pg = []
    for i, ps in enumerate(groups):
        frac = (n - 1 - i) / (n - 1) if n > 1 else 0.0
        pg.append({"params": ps, "lr": lr * first_layer_factor**frac, "depth": i})
    return d.build(pg, lr, **base_kwargs)


layerwise.signalprop_takes_model = True  # type: ignore[attr-defined]

OPTIMIZERS: Registry[OptimizerDef] = Registry("optimizer")

_WD = {"weight_decay": 0.0}
for _d in (
    OptimizerDef("sgd", torch.optim.SGD, "plain SGD", {"lr": 0.1, "momentum": 0.0, **_WD},
                 engine=B.SGD),
    OptimizerDef("momentum", torch.optim.SGD, "SGD with momentum 0.9",
                 {"lr": 0.01, "momentum": 0.9}),
    OptimizerDef("nesterov", torch.optim.SGD, "Nesterov momentum 0.9",
                 {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    OptimizerDef("adam", torch.optim.Adam, "Adam (Kingma & Ba 2015)",
                 {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, **_WD},
                 {"betas": ("beta1", "beta2")}, engine=B.Adam),
    OptimizerDef("adamw", torch.optim.AdamW, "AdamW (Loshchilov & Hutter 2019)", {"lr": 1e-3}),
    # lr 1e-3 (Tieleman & Hinton's lecture; the remedies and the lab used it); torch's own
    # default and the engine's before the vocabulary: 1e-2
    OptimizerDef("rmsprop", torch.optim.RMSprop, "RMSProp (Tieleman & Hinton 2012)",
                 {"lr": 1e-3, "alpha": 0.99, "eps": 1e-8, "momentum": 0.0, **_WD},
                 engine=B.RMSProp),
    OptimizerDef("rprop", torch.optim.Rprop, "iRprop- (Riedmiller & Braun 1993)",
                 {"lr": 1e-2, "eta_minus": 0.5, "eta_plus": 1.2, "step_min": 1e-6,
                  "step_max": 50.0, **_WD},
                 {"etas": ("eta_minus", "eta_plus"), "step_sizes": ("step_min", "step_max")},
                 engine_only=("weight_decay",), engine=B.Rprop),
    OptimizerDef("adagrad", torch.optim.Adagrad, "Adagrad (Duchi et al. 2011)", {"lr": 1e-2}),
    OptimizerDef("smorms3", SMORMS3, "SMORMS3 (Funk 2015)", {"lr": 1e-3, "eps": 1e-16, **_WD},
                 engine_only=("weight_decay",), engine=B.SMORMS3),
    OptimizerDef("vsgd", VSGD, "vSGD (Schaul, Zhang & LeCun 2013)",
                 {"lr": 1.0, "curvature": "secant"}),
    OptimizerDef("lars", LARS, "LARS trust ratio (You et al. 2017)",
                 {"lr": 1.0, "momentum": 0.9, "trust": 0.01}),
    OptimizerDef("layerwise", layerwise, "depth-scaled per-layer rates",
                 {"lr": 0.1, "base": "sgd", "first_layer_factor": 10.0}, takes_model=True),
):
    OPTIMIZERS.register(_d.name, _d, doc=_d.doc, **_d.defaults)


def optimizer(name: str) -> OptimizerDef:
    """The :class:`OptimizerDef` of ``name`` (``ValueError`` listing the valid names)."""
    return OPTIMIZERS.get(name)
