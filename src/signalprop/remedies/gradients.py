"""Gradient transforms: small, composable edits of ``p.grad`` between ``backward()`` and any
torch optimiser's ``step()`` (in the manner of optax's ``chain``)::

    t = chain(adaptive_clip(0.01), clip_by_global_norm(1.0))
    loss.backward()
    t(model)            # or t(model.parameters()); edits the .grad tensors in place
    opt.step()
    t.stats()           # {'norm_before': ..., 'norm_after': ...} of the last call

Every transform records the global gradient norm before and after its edit (as tensors on the
device; :meth:`GradientTransform.stats` converts them), so a clipping remedy can be logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from signalprop import stats
from signalprop._registry import Registry

Target = nn.Module | Iterable[torch.Tensor]


@dataclass
class GradContext:
    """The tensors a transform works on.

    Attributes:
        params: Parameters that have a gradient.
        grads: Their ``.grad`` tensors (edited in place).
        final: For each parameter, whether it belongs to the model's final layer (AGC skips it).
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    final: list[bool]


def _final_param_ids(model: nn.Module) -> set[int]:
    # The final layer: the last module (registration order) owning a weight of >= 2 dims; for an
    # nn.Sequential MLP or CNN head this is the classifier.
    last: nn.Module | None = None
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and next(m.children(), None) is None:
            last = m
    if last is None:
        return set()
    return {id(p) for p in last.parameters(recurse=False)}


def gradient_context(target: Target) -> GradContext:
    """Collect parameters with gradients from a model or an iterable of parameters.

    For a plain iterable the final layer is taken to be the last parameter with >= 2 dimensions
    and every parameter after it (a weight followed by its bias).
    """
    if isinstance(target, nn.Module):
        params = [p for p in target.parameters() if p.grad is not None]
        final_ids = _final_param_ids(target)
        final = [id(p) in final_ids for p in params]
    else:
        if isinstance(target, torch.Tensor):
            target = [target]
        allp = list(target)
        for p in allp:
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"gradient transforms take a model or an iterable of tensors, got an item of "
                    f"type {type(p).__name__}"
                )
        last_matrix = max((i for i, p in enumerate(allp) if p.dim() >= 2), default=len(allp))
        final_all = [i >= last_matrix for i in range(len(allp))]
        params = [p for p in allp if p.grad is not None]
        final = [f for p, f in zip(allp, final_all, strict=True) if p.grad is not None]
    return GradContext(params, [p.grad for p in params], final)  # type: ignore[misc]


class GradientTransform:
    """Base class: edits gradients in place; call with a model or its parameters.

    Subclasses implement :meth:`update`. ``record_norms`` (default True) stores the global
    gradient norm before and after the edit in ``self.last``.
    """

    name = "identity"
    #: The attributes :meth:`hparams` reports (the constructor's arguments).
    _hparams: tuple[str, ...] = ()

    def __init__(self, record_norms: bool = True) -> None:
        self.record_norms = record_norms
        self.last: dict[str, torch.Tensor] = {}
        self.calls = 0

    def update(self, ctx: GradContext) -> None:
        """Edit ``ctx.grads`` in place (override)."""

    def __call__(self, target: Target) -> GradientTransform:
        ctx = target if isinstance(target, GradContext) else gradient_context(target)
        if not ctx.grads:
            return self
        if self.record_norms:
            before = stats.global_norm(ctx.grads)
        self.update(ctx)
        if self.record_norms:
            self.last = {"norm_before": before, "norm_after": stats.global_norm(ctx.grads)}
        self.calls += 1
        return self

    def apply(self, model: nn.Module) -> GradientTransform:
        """Same as calling the transform on ``model``."""
        return self(model)

    def stats(self) -> dict[str, float]:
        """The last call's recorded norms as floats (one device sync)."""
        return {k: float(v) for k, v in self.last.items()}

    def reset(self) -> None:
        """Forget recorded state (transforms here are otherwise stateless)."""
        self.last = {}
        self.calls = 0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"

    def hparams(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._hparams}


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


class Chain(GradientTransform):
    """Apply transforms in order; records the norm before the first and after the last."""

    name = "chain"

    def __init__(self, *transforms: GradientTransform, record_norms: bool = True) -> None:
        super().__init__(record_norms)
        flat: list[GradientTransform] = []
        for t in transforms:
            if not isinstance(t, GradientTransform):
                raise TypeError(f"chain() takes GradientTransforms, got {type(t).__name__}")
            flat.extend(t.transforms if isinstance(t, Chain) else [t])
        self.transforms = flat

    def update(self, ctx: GradContext) -> None:
        for t in self.transforms:
            t(ctx)

    def reset(self) -> None:
        super().reset()
        for t in self.transforms:
            t.reset()

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.transforms))})"


def chain(*transforms: GradientTransform) -> Chain:
    """Compose gradient transforms (applied left to right)."""
    return Chain(*transforms)


class ClipByGlobalNorm(GradientTransform):
    """g <- g * min(1, max_norm / ||g||), ||g|| the norm over all parameters (Pascanu et al. 2013).

    After the call the global norm equals ``max_norm`` exactly (up to rounding) when it was
    larger. A non-finite norm leaves the gradients untouched (the trainer reports divergence).
    """

    name = "clip_by_global_norm"
    _hparams = ("max_norm",)

    def __init__(self, max_norm: float = 1.0, record_norms: bool = True) -> None:
        super().__init__(record_norms)
        self.max_norm = _positive("max_norm", max_norm)

    def update(self, ctx: GradContext) -> None:
        total = stats.global_norm(ctx.grads).to(ctx.grads[0].device)
        scale = torch.clamp(self.max_norm / total, max=1.0)
        scale = torch.where(torch.isfinite(total), scale, torch.ones_like(scale))
        for g in ctx.grads:
            g.mul_(scale.to(g.dtype))


class ClipByValue(GradientTransform):
    """g <- clip(g, -clip_value, clip_value), elementwise."""

    name = "clip_by_value"
    _hparams = ("clip_value",)

    def __init__(self, clip_value: float = 1.0, record_norms: bool = True) -> None:
        super().__init__(record_norms)
        self.clip_value = _positive("clip_value", clip_value)

    def update(self, ctx: GradContext) -> None:
        for g in ctx.grads:
            g.clamp_(-self.clip_value, self.clip_value)


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm per output unit: dims 1.. reduced for weights [out, in, ...] (shape [out, 1, ...]);
    scalars and vectors (biases, gains) use their whole norm, as in the NFNets code."""
    if x.dim() <= 1:
        return x.norm()
    return x.norm(dim=tuple(range(1, x.dim())), keepdim=True)


class AdaptiveClip(GradientTransform):
    """Adaptive gradient clipping (Brock, De, Smith & Simonyan 2021, NFNets, eq. 3).

    For each unit i (row of a weight): if ||G_i|| / max(||W_i||, eps) > clipping then
    G_i <- clipping * max(||W_i||, eps) / ||G_i|| * G_i. The final layer is left alone
    (``exclude_final``), as the paper recommends.

    Args:
        clipping: lambda (0.01 by default).
        eps: Floor on the weight norm, so zero-initialised parameters can still move (1e-3).
        exclude_final: Skip the model's final layer (see :func:`gradient_context`).
    """

    name = "adaptive_clip"
    _hparams = ("clipping", "eps", "exclude_final")

    def __init__(
        self,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude_final: bool = True,
        record_norms: bool = True,
    ) -> None:
        if not clipping > 0 or not eps > 0:
            raise ValueError(f"need clipping > 0 and eps > 0, got {clipping}, {eps}")
        super().__init__(record_norms)
        self.clipping, self.eps, self.exclude_final = float(clipping), float(eps), exclude_final

    def update(self, ctx: GradContext) -> None:
        with torch.no_grad():
            for p, g, fin in zip(ctx.params, ctx.grads, ctx.final, strict=True):
                if fin and self.exclude_final:
                    continue
                max_norm = unitwise_norm(p).clamp_min(self.eps) * self.clipping
                gn = unitwise_norm(g)
                # 1e-6 floor on ||G_i|| as in the reference code: no 0/0 for a zero gradient
                clipped = g * (max_norm / gn.clamp_min(1e-6))
                g.copy_(torch.where(gn > max_norm, clipped, g))


class AddDecayedWeights(GradientTransform):
    """g <- g + weight_decay * w (L2 regularisation; equals SGD's coupled weight decay).

    ``skip_vectors`` leaves biases and normalisation gains (1-d parameters) undecayed.
    """

    name = "add_decayed_weights"
    _hparams = ("weight_decay", "skip_vectors")

    def __init__(
        self, weight_decay: float = 5e-4, skip_vectors: bool = True, record_norms: bool = True
    ) -> None:
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(record_norms)
        self.weight_decay, self.skip_vectors = float(weight_decay), skip_vectors

    def update(self, ctx: GradContext) -> None:
        with torch.no_grad():
            for p, g in zip(ctx.params, ctx.grads, strict=True):
                if self.skip_vectors and p.dim() <= 1:
                    continue
                g.add_(p, alpha=self.weight_decay)


def clip_by_global_norm(max_norm: float = 1.0) -> ClipByGlobalNorm:
    """Rescale all gradients so their global norm is at most ``max_norm``.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> p.grad = torch.tensor([3.0, 4.0, 0.0])
        >>> clip_by_global_norm(1.0)([p]).stats()
        {'norm_before': 5.0, 'norm_after': 1.0}
        >>> p.grad
        tensor([0.6000, 0.8000, 0.0000])
    """
    return ClipByGlobalNorm(max_norm)


def clip_by_value(clip_value: float = 1.0) -> ClipByValue:
    """Clamp every gradient entry to [-clip_value, clip_value]."""
    return ClipByValue(clip_value)


def adaptive_clip(
    clipping: float = 0.01, eps: float = 1e-3, exclude_final: bool = True
) -> AdaptiveClip:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021)."""
    return AdaptiveClip(clipping, eps, exclude_final)


def add_decayed_weights(weight_decay: float = 5e-4, skip_vectors: bool = True) -> AddDecayedWeights:
    """Add ``weight_decay * w`` to each weight's gradient."""
    return AddDecayedWeights(weight_decay, skip_vectors)


GRAD_TRANSFORMS: Registry = Registry("gradient transform")
GRAD_TRANSFORMS.register("clip_by_global_norm", clip_by_global_norm, max_norm=1.0)
GRAD_TRANSFORMS.register("clip_by_value", clip_by_value, clip_value=1.0)
GRAD_TRANSFORMS.register("adaptive_clip", adaptive_clip, clipping=0.01, eps=1e-3)
GRAD_TRANSFORMS.register("add_decayed_weights", add_decayed_weights, weight_decay=5e-4)


def as_transform(spec: GradientTransform | Sequence[GradientTransform] | None) -> GradientTransform | None:
    """``None``, one transform, or a sequence (chained)."""
    if spec is None or isinstance(spec, GradientTransform):
        return spec
    return chain(*spec)
