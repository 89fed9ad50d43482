"""The cure cabinet: remedies against vanishing/exploding gradients as composable pieces.

A :class:`Remedy` bundles up to three optional parts, each a registered piece:

- a model transform ``(model, example_batch) -> new model`` (an initialisation, a normalisation,
  a skip connection, another activation, fewer layers);
- an optimiser choice (a name from :data:`OPTIMIZERS` with its own learning rate and kwargs) or a
  learning-rate multiplier;
- a gradient transform (clipping, AGC, weight decay) applied between ``backward`` and ``step``.

Remedies combine with ``+`` (``get_remedy("batchnorm+adam")``); the names in :data:`REMEDIES`
are a contract with the diagnosis (its prescriptions) and ``signalprop doctor`` (its trials).

Sub-modules: :mod:`.activations` (ACTIVATIONS, RBF, Scaled), :mod:`.transforms` (TRANSFORMS),
:mod:`.gradients` (GRAD_TRANSFORMS, chain, clipping, AGC), :mod:`.optimizers` (OPTIMIZERS,
SMORMS3, VSGD, LARS); initialisations live in :mod:`signalprop.init` (INITS).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from signalprop import init as _init
from signalprop._registry import Registry, unknown_name_message
from signalprop.remedies import recurrent as _rec
from signalprop.remedies.activations import (
    ACTIVATIONS,
    RBF,
    Erf,
    Gaussian,
    Identity,
    RBFKernel,
    Scaled,
    Sin,
    SquaredDistance,
    activation_kind,
    infer_activation,
    make_activation,
    nf_gain,
)
from signalprop.remedies.gradients import (
    GRAD_TRANSFORMS,
    AdaptiveClip,
    AddDecayedWeights,
    Chain,
    ClipByGlobalNorm,
    ClipByValue,
    GradientTransform,
    adaptive_clip,
    add_decayed_weights,
    chain,
    clip_by_global_norm,
    clip_by_value,
    unitwise_norm,
)
from signalprop.remedies.optimizers import (
    DEFAULT_LR,
    LARS,
    OPTIMIZERS,
    SMORMS3,
    VSGD,
    layerwise,
    make_optimizer,
)
from signalprop.remedies.transforms import (
    TRANSFORMS,
    Highway,
    Residual,
    fewer_layers,
    highway,
    insert_norm,
    residual,
    scale_activations,
    swap_activation,
    weight_norm,
)
from signalprop.vocab.optimizers import optimizer

ModelTransform = Callable[[nn.Module, "torch.Tensor | None"], nn.Module]


def _compose(
    a: ModelTransform | None, b: ModelTransform | None
) -> ModelTransform | None:
    if a is None:
        return b
    if b is None:
        return a

    def both(model: nn.Module, batch: torch.Tensor | None = None) -> nn.Module:
        return b(a(model, batch), batch)

    return both


@dataclass(frozen=True)
class Remedy:
    """One remedy, or a combination of several.

    Attributes:
        name: Registry name (``"batchnorm+adam"`` for a combination).
        transform: ``(model, example_batch) -> new model`` or ``None``. Must not modify its input.
        optimizer: Optimiser name from :data:`OPTIMIZERS` to switch to, or ``None`` (keep the
            user's).
        lr: Learning rate for that optimiser (``None``: :data:`DEFAULT_LR` of the optimiser when
            switching, else the user's rate).
        lr_scale: Multiplier on the resulting learning rate (``lower_lr``: 0.1).
        optimizer_kwargs: Extra optimiser keyword arguments.
        grad_transform: A factory ``() -> GradientTransform`` (fresh state per run) or ``None``.
        description: One line saying what the remedy does and after whom.
        warmup: Linear learning-rate warm-up over this fraction of the run's steps (0: none).
    """

    name: str
    transform: ModelTransform | None = None
    optimizer: str | None = None
    lr: float | None = None
    lr_scale: float = 1.0
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    grad_transform: Callable[[], GradientTransform] | None = None
    description: str = ""
    warmup: float = 0.0

    def apply(self, model: nn.Module, example_batch: torch.Tensor | None = None) -> nn.Module:
        """The transformed model (a new object; ``model`` itself is never modified)."""
        if self.transform is None:
            return model
        return self.transform(model, example_batch)

    def make_grad_transform(self) -> GradientTransform | None:
        """A fresh gradient transform for one run (``None`` when the remedy has none)."""
        return None if self.grad_transform is None else self.grad_transform()

    def optimizer_config(
        self, optimizer: str | Any = "sgd", lr: float = 0.1, kwargs: dict[str, Any] | None = None
    ) -> tuple[Any, float, dict[str, Any]]:
        """(optimizer, lr, kwargs) to train with, given the user's baseline choice."""
        kw = dict(kwargs or {})
        if self.optimizer is not None:
            opt = self.optimizer
            new_lr = self.lr if self.lr is not None else DEFAULT_LR.get(opt, lr)
            kw = dict(self.optimizer_kwargs)  # the baseline's kwargs belong to its optimiser
        else:
            opt = optimizer
            new_lr = self.lr if self.lr is not None else lr
            kw.update(self.optimizer_kwargs)
        return opt, new_lr * self.lr_scale, kw

    def __add__(self, other: Remedy) -> Remedy:
        if not isinstance(other, Remedy):
            return NotImplemented
        if self.optimizer and other.optimizer and self.optimizer != other.optimizer:
            raise ValueError(
                f"cannot combine {self.name!r} and {other.name!r}: both choose an optimiser "
                f"({self.optimizer} vs {other.optimizer})"
            )
        g1, g2 = self.grad_transform, other.grad_transform
        if g1 is not None and g2 is not None:
            def gt() -> GradientTransform:
                return chain(g1(), g2())
        else:
            gt = g1 or g2  # type: ignore[assignment]
        return Remedy(
            name=f"{self.name}+{other.name}",
            transform=_compose(self.transform, other.transform),
            optimizer=self.optimizer or other.optimizer,
            lr=other.lr if other.lr is not None else self.lr,
            lr_scale=self.lr_scale * other.lr_scale,
            optimizer_kwargs={**self.optimizer_kwargs, **other.optimizer_kwargs},
            grad_transform=gt,
            description="; ".join(d for d in (self.description, other.description) if d),
            warmup=max(self.warmup, other.warmup),
        )

    def with_name(self, name: str) -> Remedy:
        return replace(self, name=name)


#: name -> factory(**hparams) -> Remedy
REMEDIES: Registry[Callable[..., Remedy]] = Registry("remedy")


def _init_transform(fn: Callable[..., Any], **kw: Any) -> ModelTransform:
    def t(model: nn.Module, batch: torch.Tensor | None = None) -> nn.Module:
        new = copy.deepcopy(model)
        fn(new, **kw)
        return new

    return t


@REMEDIES.register("critical_init", sigma_b2=0.0, orthogonal=False, sigma_w2=None)
def _critical_init(sigma_b2: float = 0.0, orthogonal: bool = False,
                   sigma_w2: Mapping[str, float] | None = None) -> Remedy:
    """Edge-of-chaos init. ``sigma_w2`` maps weight-layer module names to their sigma_w^2 (as
    computed for one model by :func:`signalprop.diagnosis.explain.explain`); without it every
    layer gets the critical sigma_w^2 of the model's inferred activation."""
    per_layer = dict(sigma_w2) if sigma_w2 is not None else None

    def t(model: nn.Module, batch: torch.Tensor | None = None) -> nn.Module:
        new = copy.deepcopy(model)
        if per_layer is None:
            kind = infer_activation(new)  # a clear error when the activation cannot be inferred
            _init.critical_(new, activation=kind, sigma_b2=sigma_b2, orthogonal=orthogonal)
            return new
        # lazy: the mean-field theory (scipy) adds ~0.8 s to importing the remedies (measured)
        from signalprop.theory.torch_adapter import mean_field_init_

        for name, sw2 in per_layer.items():
            try:
                mod = new.get_submodule(name)
            except AttributeError:
                raise ValueError(f"critical_init: the model has no module {name!r}") from None
            mean_field_init_(mod, sw2, sigma_b2, orthogonal=orthogonal)
        return new

    desc = "weights at the edge of chaos, chi_1 = 1 (Poole et al. 2016; Schoenholz et al. 2017)"
    if per_layer:
        sws = sorted({round(v ** 0.5, 3) for v in per_layer.values()})
        desc += (f"; sigma_w = {', '.join(f'{v:g}' for v in sws)}, sigma_b^2 = {sigma_b2:.3g} "
                 "computed for this model")
    return Remedy("critical_init", t, description=desc)


@REMEDIES.register("orthogonal_init", gain=1.0)
def _orthogonal_init(gain: float = 1.0) -> Remedy:
    return Remedy("orthogonal_init", _init_transform(_init.orthogonal_, gain=gain),
                  description="orthogonal weights, biases 0 (Saxe et al. 2013)")


@REMEDIES.register("xavier_init", gain=1.0)
def _xavier_init(gain: float = 1.0) -> Remedy:
    return Remedy("xavier_init", _init_transform(_init.xavier_, gain=gain),
                  description="Var W = 2/(fan_in + fan_out), biases 0 (Glorot & Bengio 2010)")


@REMEDIES.register("kaiming_init", nonlinearity="relu")
def _kaiming_init(nonlinearity: str = "relu") -> Remedy:
    return Remedy("kaiming_init", _init_transform(_init.kaiming_, nonlinearity=nonlinearity),
                  description="Var W = 2/fan_in, biases 0 (He et al. 2015)")


@REMEDIES.register("lsuv_init", tol=0.1, max_iter=10)
def _lsuv_init(tol: float = 0.1, max_iter: int = 10) -> Remedy:
    def t(model: nn.Module, batch: torch.Tensor | None = None) -> nn.Module:
        if batch is None:
            raise ValueError("lsuv_init needs an example input batch (LSUV rescales on data)")
        new = copy.deepcopy(model)
        _init.lsuv_(new, batch, tol=tol, max_iter=max_iter)
        return new

    return Remedy("lsuv_init", t, description=(
        "orthonormal init, then unit output variance layer by layer on data (Mishkin & Matas 2016)"))


def _transform_remedy(name: str, tname: str, description: str, **kw: Any) -> Remedy:
    fn = TRANSFORMS.get(tname)

    def t(model: nn.Module, batch: torch.Tensor | None = None) -> nn.Module:
        return fn(model, batch, **kw)

    return Remedy(name, t, description=description)


@REMEDIES.register("batchnorm", position="before")
def _batchnorm(position: str = "before") -> Remedy:
    return _transform_remedy("batchnorm", "batchnorm",
                             f"batch norm {position} each activation (Ioffe & Szegedy 2015)",
                             position=position)


@REMEDIES.register("layernorm", position="before")
def _layernorm(position: str = "before") -> Remedy:
    return _transform_remedy("layernorm", "layernorm",
                             f"layer norm {position} each activation (Ba et al. 2016)",
                             position=position)


@REMEDIES.register("weightnorm")
def _weightnorm() -> Remedy:
    return _transform_remedy("weightnorm", "weightnorm",
                             "w = g v/||v|| on every layer (Salimans & Kingma 2016)")


@REMEDIES.register("residual", alpha=1.0)
def _residual(alpha: float = 1.0) -> Remedy:
    return _transform_remedy("residual", "residual",
                             "x + block(x) around width-preserving blocks (He et al. 2016)",
                             alpha=alpha)


@REMEDIES.register("highway", gate_bias=-2.0)
def _highway(gate_bias: float = -2.0) -> Remedy:
    return _transform_remedy("highway", "highway",
                             "gated skip T x block(x) + (1-T) x (Srivastava et al. 2015)",
                             gate_bias=gate_bias)


@REMEDIES.register("relu")
def _relu() -> Remedy:
    return _transform_remedy("relu", "swap_activation",
                             "replace the activations by ReLU (Glorot et al. 2011)",
                             activation="relu")


@REMEDIES.register("scaled_activation", a="nf", learnable=False)
def _scaled_activation(a: float | str = "nf", learnable: bool = False) -> Remedy:
    return _transform_remedy("scaled_activation", "scaled_activation",
                             "a * phi(z), a = 1/std(phi(z)) (Brock et al. 2021)",
                             a=a, learnable=learnable)


#: The remedies that switch optimiser (rate: :data:`DEFAULT_LR`), with their sources.
_OPTIMIZER_REMEDIES = {
    "adam": "Adam (Kingma & Ba 2015)",
    "rmsprop": "RMSProp (Tieleman & Hinton 2012)",
    "rprop": "sign-based Rprop (Riedmiller & Braun 1993)",
    "smorms3": "SMORMS3 (Funk 2015)",
    "vsgd": "vSGD adaptive rates (Schaul, Zhang & LeCun 2013)",
}


def _register_optimizer_remedy(name: str, description: str) -> None:
    default_lr = DEFAULT_LR[name]

    def factory(lr: float = default_lr) -> Remedy:
        return Remedy(name, optimizer=name, lr=lr, description=description)

    REMEDIES.register(name, factory, lr=default_lr)


for _name, _description in _OPTIMIZER_REMEDIES.items():
    _register_optimizer_remedy(_name, _description)


@REMEDIES.register("layerwise_lr", **{k: optimizer("lars").defaults[k]
                                      for k in ("lr", "trust", "momentum")})
def _layerwise_lr(lr: float, trust: float, momentum: float) -> Remedy:
    return Remedy("layerwise_lr", optimizer="lars", lr=lr,
                  optimizer_kwargs={"trust": trust, "momentum": momentum},
                  description="LARS per-layer trust ratio ||w||/||g|| (You et al. 2017)")


@REMEDIES.register("clip_norm", max_norm=1.0)
def _clip_norm(max_norm: float = 1.0) -> Remedy:
    return Remedy("clip_norm", grad_transform=lambda: clip_by_global_norm(max_norm),
                  description=f"clip the global gradient norm at {max_norm} (Pascanu et al. 2013)")


@REMEDIES.register("clip_value", clip_value=1.0)
def _clip_value(clip_value: float = 1.0) -> Remedy:
    return Remedy("clip_value", grad_transform=lambda: clip_by_value(clip_value),
                  description=f"clip each gradient entry to +-{clip_value}")


@REMEDIES.register("agc", clipping=0.01, eps=1e-3)
def _agc(clipping: float = 0.01, eps: float = 1e-3) -> Remedy:
    return Remedy("agc", grad_transform=lambda: adaptive_clip(clipping, eps),
                  description="unit-wise adaptive gradient clipping (Brock et al. 2021)")


@REMEDIES.register("lower_lr", factor=0.1)
def _lower_lr(factor: float = 0.1) -> Remedy:
    if not 0 < factor:
        raise ValueError(f"lower_lr factor must be > 0, got {factor}")
    return Remedy("lower_lr", lr_scale=factor, description=f"learning rate x {factor}")


@REMEDIES.register("weight_decay", weight_decay=5e-4)
def _weight_decay(weight_decay: float = 5e-4) -> Remedy:
    return Remedy("weight_decay", grad_transform=lambda: add_decayed_weights(weight_decay),
                  description=f"L2 weight decay {weight_decay} on the weights")


@REMEDIES.register("warmup", fraction=0.1)
def _warmup(fraction: float = 0.1) -> Remedy:
    if not 0 < fraction <= 1:
        raise ValueError(f"warmup fraction must be in (0, 1], got {fraction}")
    return Remedy("warmup", warmup=fraction, description=(
        f"linear learning-rate warm-up over the first {fraction:.0%} of the steps "
        "(Goyal et al. 2017; needed by post-LN transformers, Xiong et al. 2020)"))


@REMEDIES.register("pre_ln")
def _pre_ln() -> Remedy:
    return _transform_remedy("pre_ln", "pre_ln", "layer norm before each attention / "
                             "feed-forward sub-block instead of after the residual sum "
                             "(pre-LN; Xiong et al. 2020)")


@REMEDIES.register("fewer_layers", fraction=0.5)
def _fewer_layers(fraction: float = 0.5) -> Remedy:
    return _transform_remedy("fewer_layers", "fewer_layers",
                             f"keep {fraction:.0%} of the hidden blocks", fraction=fraction)


def _recurrent_remedy(name: str, fn: Callable[..., nn.Module], description: str,
                      **kw: Any) -> Remedy:
    def t(model: nn.Module, batch: torch.Tensor | None = None) -> nn.Module:
        return fn(model, batch, **kw)

    return Remedy(name, t, description=description)


@REMEDIES.register("lstm")
def _lstm() -> Remedy:
    return _recurrent_remedy("lstm", _rec.to_gated, "vanilla RNN -> LSTM (Hochreiter & "
                             "Schmidhuber 1997)", cell="lstm")


@REMEDIES.register("gru")
def _gru() -> Remedy:
    return _recurrent_remedy("gru", _rec.to_gated, "vanilla RNN -> GRU (Cho et al. 2014)",
                             cell="gru")


@REMEDIES.register("orthogonal_recurrent_init", gain=1.0)
def _orthogonal_recurrent_init(gain: float = 1.0) -> Remedy:
    return _recurrent_remedy("orthogonal_recurrent_init", _rec.orthogonal_recurrent_init,
                             "orthogonal recurrent weights per gate (Saxe et al. 2014)",
                             gain=gain)


@REMEDIES.register("identity_recurrent_init", scale=1.0)
def _identity_recurrent_init(scale: float = 1.0) -> Remedy:
    return _recurrent_remedy("identity_recurrent_init", _rec.identity_recurrent_init,
                             "W_hh = I, zero recurrent bias (IRNN, Le et al. 2015)", scale=scale)


@REMEDIES.register("forget_gate_bias", value=1.0)
def _forget_gate_bias(value: float = 1.0) -> Remedy:
    return _recurrent_remedy("forget_gate_bias", _rec.forget_gate_bias,
                             f"LSTM forget-gate bias {value} (Jozefowicz et al. 2015)",
                             value=value)


@REMEDIES.register("truncated_bptt", k=20)
def _truncated_bptt(k: int = 20) -> Remedy:
    return _recurrent_remedy("truncated_bptt", _rec.truncated_bptt,
                             f"back-propagate through at most {k} time steps (Williams & Peng "
                             "1990)", k=k)


def remedy_names() -> list[str]:
    """Registered single-remedy names, sorted."""
    return REMEDIES.names()


def get_remedy(name: str | Remedy, **overrides: Any) -> Remedy:
    """The remedy ``name``; ``"a+b"`` combines registered remedies left to right.

    ``overrides`` (only for a single name) replace the remedy's default hyper-parameters.

    Raises:
        ValueError: an unknown name (the message lists the valid names), conflicting parts.
    """
    if isinstance(name, Remedy):
        return name
    if not isinstance(name, str):
        raise TypeError(f"a remedy is a name or a Remedy, got {type(name).__name__}")
    parts = [p.strip() for p in name.split("+")]
    if any(not p for p in parts):
        raise ValueError(f"malformed remedy combination {name!r} (empty part)")
    for p in parts:
        if p not in REMEDIES:
            raise ValueError(unknown_name_message("remedy", p, REMEDIES.names()))
    if len(parts) > 1 and overrides:
        raise ValueError("hyper-parameter overrides apply to a single remedy, not a combination")
    out: Remedy | None = None
    for p in parts:
        r = REMEDIES.build(p, **overrides)
        out = r if out is None else out + r
    assert out is not None
    return out


__all__ = [
    "ACTIVATIONS", "DEFAULT_LR", "GRAD_TRANSFORMS", "OPTIMIZERS", "REMEDIES", "TRANSFORMS",
    "RBF", "LARS", "SMORMS3", "VSGD", "AdaptiveClip", "AddDecayedWeights", "Chain",
    "ClipByGlobalNorm", "ClipByValue", "Erf", "Gaussian", "GradientTransform", "Highway",
    "Identity", "RBFKernel", "Remedy", "Residual", "Scaled", "Sin", "SquaredDistance",
    "activation_kind", "adaptive_clip", "add_decayed_weights", "chain", "clip_by_global_norm",
    "clip_by_value", "fewer_layers", "get_remedy", "highway", "infer_activation", "insert_norm",
    "layerwise", "make_activation", "make_optimizer", "nf_gain", "remedy_names", "residual",
    "scale_activations", "swap_activation", "unitwise_norm", "weight_norm",
]
