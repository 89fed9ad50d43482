"""One instrumented training loop, :func:`fit`, shared by ``doctor``, ``trial`` and the lab.

It trains any ``nn.Module`` on any batch form:

- ``(x, y)`` or ``(x1, x2, ..., y)`` tuples: ``model(*xs)``, then ``loss_fn(prediction, y)``;
- dict batches (Hugging Face style): ``model(**batch)``, then ``loss_fn(prediction, batch)``, or,
  with ``loss_fn=None``, the loss the model returns (``output.loss`` / ``output["loss"]``);
- anything else through ``step_fn(model, batch) -> loss``.

The *prediction* handed to ``loss_fn`` is the output itself when it is a tensor, its ``.logits``
(``ModelOutput``) or ``["logits"]`` entry, or the first element of a tuple.

One divergence policy (:func:`divergence_reason`): a non-finite loss or gradient, or a loss above
``diverge_factor x max(first loss, 1)``, stops the run; divergence is an outcome recorded in the
:class:`FitResult`, never an exception. Ctrl-C stops the run too and returns what was trained
(``interrupted=True``).

Summary numbers have one definition each: :func:`signalprop.stats.grad_ratio` and friends on the
record, :attr:`FitResult.final_loss` on the losses, and the *trivial baseline*
(:class:`TrivialBaseline`): the loss of the best constant prediction under the run's own loss,
computed from the data (entropy of the label frequencies for classification, ln C when balanced;
the target variance for squared-error regression).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from signalprop import stats
from signalprop.data import Dataset
from signalprop.probe import Probe
from signalprop.record import Record
from signalprop.remedies.optimizers import OPTIMIZERS
from signalprop.validation import (
    UserError,
    check_batch_size,
    explain_forward_error,
    explain_loss_error,
    not_attached_message,
    user_code,
)

LossFn = Callable[[Any, Any], torch.Tensor]
StepFn = Callable[[nn.Module, Any], torch.Tensor]
DataLike = Any  # DataLoader | (x, y) | (x1, ..., y) | dict of tensors | Dataset | iterable

OptimizerSpec = str | torch.optim.Optimizer | Callable[..., torch.optim.Optimizer]

#: A finite loss above ``DIVERGE_FACTOR x max(first loss, 1)`` counts as divergence.
DIVERGE_FACTOR: float = 100.0

#: Keys under which a dict batch carries its targets (first match wins).
TARGET_KEYS: tuple[str, ...] = ("labels", "label", "y", "targets", "target")


# --- optimisers --------------------------------------------------------------------------------
def make_optimizer(
    spec: OptimizerSpec, model: nn.Module, lr: float, **kwargs: Any
) -> torch.optim.Optimizer:
    """Build an optimiser from a registered name, a factory ``f(params, lr=...)`` or pass through
    an existing instance (which must own ``model``'s parameters)."""
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    if isinstance(spec, str):
        entry = OPTIMIZERS.entry(spec)
        kw = {**entry.defaults, **kwargs}
        fn = entry.fn
        # registry entries may take the model (layer-wise rates) or its parameters
        if getattr(fn, "signalprop_takes_model", False):
            return fn(model, lr=lr, **kw)
        return fn(_trainable(model), lr=lr, **kw)
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


# --- data ----------------------------------------------------------------------------------------
def as_batches(
    data: DataLike, batch_size: int = 64, seed: int = 0
) -> Callable[[], Iterator[Any]]:
    """Normalise supported data forms to a re-iterable source of mini-batches.

    Tensors in memory (a tuple of tensors ``(x, ..., y)`` or a dict of tensors with a common
    first dimension) are shuffled into mini-batches of ``batch_size``; a :class:`Dataset` uses
    its loader; any other iterable (a DataLoader) is iterated as it is.
    """
    check_batch_size(batch_size)
    if isinstance(data, Dataset):
        data = data.loader(batch_size=batch_size, shuffle=True, seed=seed)
    tensors: list[torch.Tensor] | None = None
    keys: list[str] | None = None
    if isinstance(data, (tuple, list)) and len(data) >= 2 and all(
        isinstance(t, torch.Tensor) for t in data
    ):
        tensors = list(data)
    elif isinstance(data, Mapping) and data and all(
        isinstance(t, torch.Tensor) for t in data.values()
    ):
        keys, tensors = list(data), list(data.values())
    if tensors is not None:
        n = tensors[0].shape[0] if tensors[0].dim() else 0
        for t in tensors[1:]:
            if not t.dim() or t.shape[0] != n:
                if len(tensors) == 2:
                    raise ValueError(
                        "inputs and targets disagree on the number of examples: "
                        f"{n} vs {t.shape[0] if t.dim() else 0}"
                    )
                raise ValueError(
                    "the data tensors disagree on the number of examples: "
                    f"{[t.shape[0] if t.dim() else 0 for t in tensors]}"
                )
        if n == 0:
            raise ValueError("the data set is empty")
        g = torch.Generator().manual_seed(seed)
        ts = tensors

        def gen() -> Iterator[Any]:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                j = perm[i : i + batch_size]
                parts = [t[j] for t in ts]
                yield dict(zip(keys, parts, strict=True)) if keys is not None else tuple(parts)

        return gen
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        return lambda: iter(data)  # type: ignore[arg-type]
    raise TypeError(
        "data must be a DataLoader (or any iterable of batches), a tuple of tensors (x, ..., y), "
        f"a dict of tensors, or a signalprop.data.Dataset; got {type(data).__name__}"
    )


def batch_tensors(batch: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor in a batch (tuples, lists, dicts, nested)."""
    out: list[tuple[str, torch.Tensor]] = []

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            out.append((name, obj))
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{name}[{k!r}]" if name else repr(k))
        elif isinstance(obj, (tuple, list)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]" if name else f"element {i}")

    walk(batch, "")
    return out


def check_finite_data(data: DataLike, max_batches: int | None = None) -> None:
    """Refuse data containing NaN/Inf (raises ``ValueError`` naming the batch and the count)."""
    src = as_batches(data)
    for b, batch in enumerate(src()):
        if max_batches is not None and b >= max_batches:
            break
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and not isinstance(
            batch[0], (tuple, list, Mapping)
        ):
            named = [("inputs", t) for t in batch[:-1] if isinstance(t, torch.Tensor)]
            if isinstance(batch[-1], torch.Tensor):
                named.append(("targets", batch[-1]))
        else:
            named = batch_tensors(batch)
        for name, t in named:
            if t.is_floating_point():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise ValueError(f"data batch {b}: {bad} non-finite value(s) in the {name}")


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch in the legacy two-part sense (kept for callers)."""
    if isinstance(batch, Mapping):
        if "x" in batch and "y" in batch:
            return batch["x"], batch["y"]
        return batch, target_of(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[-1]
    raise TypeError(
        f"each batch must be a tuple (inputs..., targets) or a dict, got {type(batch).__name__}"
    )


def example_inputs(data: DataLike, batch_size: int = 64) -> Any:
    """Example model *inputs* from a first batch, for remedies that look at data (LSUV, shape
    checks): the input tensor of ``(x, y)``, the inputs tuple of ``(x1, x2, ..., y)``, or a dict
    batch as it is (``model(**batch)``); ``None`` when there is none to take. Note that a
    one-shot iterator (a generator) loses the batch taken here."""
    try:
        batch = next(iter(as_batches(data, batch_size=batch_size, seed=0)()))
    except (StopIteration, TypeError, ValueError):
        return None
    if isinstance(batch, Mapping):
        return batch["x"] if set(batch) == {"x", "y"} else batch
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        xs = tuple(batch[:-1])
        return xs[0] if len(xs) == 1 else xs
    return None


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``, keeping its structure."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # BatchEncoding and other dict subclasses
        except Exception:  # a mapping type that cannot be rebuilt from a dict
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def target_of(batch: Any) -> Any:
    """The targets of a batch: the last element of a tuple, or ``labels``/``label``/``y``/
    ``targets``/``target`` of a dict; ``None`` when there are none."""
    if isinstance(batch, Mapping):
        for k in TARGET_KEYS:
            if k in batch:
                return batch[k]
        return None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[-1]
    return None


# --- model outputs ------------------------------------------------------------------------------
def _get(out: Any, key: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(key)
    return getattr(out, key, None)


def prediction(out: Any) -> Any:
    """What ``loss_fn`` receives: a tensor output itself, ``.logits`` / ``["logits"]`` of a
    ``ModelOutput`` or dict, or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    logits = _get(out, "logits")
    if logits is not None:
        return logits
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


def model_loss(out: Any) -> torch.Tensor:
    """The loss a model returned: ``.loss`` / ``["loss"]``, or a scalar tensor output.

    Raises:
        TypeError: the output carries no loss (give a ``loss_fn`` or a ``step_fn``).
    """
    loss = _get(out, "loss") if not isinstance(out, torch.Tensor) else None
    if loss is None and isinstance(out, torch.Tensor) and out.numel() == 1:
        loss = out
    if loss is None:
        what = type(out).__name__
        raise TypeError(
            f"loss_fn is None but the model's output ({what}) carries no loss: pass the labels "
            "in the batch so the model computes one (Hugging Face models), give a loss_fn, or "
            "a step_fn(model, batch) -> loss"
        )
    return loss


class _DataEnded(Exception):
    """A one-shot data source ran out after some steps (internal signal of :func:`fit`)."""


@dataclass
class StepOutput:
    """One forward pass: the loss, what ``loss_fn`` saw as the prediction (``None`` with a
    ``step_fn``) and the targets (``None`` when unknown)."""

    loss: torch.Tensor
    pred: Any = None
    target: Any = None


def forward_loss(
    model: nn.Module, batch: Any, loss_fn: LossFn | None = None, step_fn: StepFn | None = None,
    *, step: int | None = None, when: str = "",
) -> StepOutput:
    """Run ``model`` on ``batch`` and compute the loss under the rules of this module.

    Exceptions raised inside the user's forward, loss or ``step_fn`` come out as
    :class:`signalprop.validation.UserCodeError` naming the step (or ``when``) and the file:line.

    Raises:
        TypeError: a batch form that needs a loss function, a loss that is not a tensor.
        ValueError: a loss that is not a scalar or not attached to the graph (while gradients
            are enabled).
    """

    def fwd(*args: Any, **kw: Any) -> Any:
        first = args[0] if args else next(iter(kw.values()), None)
        with user_code("forward", step, explain=lambda e: explain_forward_error(model, first),
                       when=when):
            return model(*args, **kw)

    def lossf(pred: Any, y: Any) -> Any:
        assert loss_fn is not None
        with user_code("loss", step, explain=explain_loss_error(pred, y, loss_fn), when=when):
            return loss_fn(pred, y)

    if step_fn is not None:
        with user_code("step_fn", step, when=when):
            out = StepOutput(step_fn(model, batch))
    elif isinstance(batch, Mapping):
        if set(batch) == {"x", "y"} and loss_fn is not None:
            # the legacy {"x": ..., "y": ...} batch of a plain model
            o = fwd(batch["x"])
            pred = prediction(o)
            out = StepOutput(lossf(pred, batch["y"]), pred, batch["y"])
        else:
            o = fwd(**batch)
            pred = prediction(o)
            loss = model_loss(o) if loss_fn is None else lossf(pred, batch)
            out = StepOutput(loss, pred, target_of(batch))
    elif isinstance(batch, (tuple, list)):
        if loss_fn is None:
            o = fwd(*batch)
            out = StepOutput(model_loss(o), prediction(o), target_of(batch))
        else:
            if len(batch) < 2:
                raise TypeError(
                    "a tuple batch needs inputs and targets (x, ..., y) when a loss_fn is given"
                )
            o = fwd(*batch[:-1])
            pred = prediction(o)
            out = StepOutput(lossf(pred, batch[-1]), pred, batch[-1])
    elif isinstance(batch, torch.Tensor) and loss_fn is None:
        o = fwd(batch)
        out = StepOutput(model_loss(o), prediction(o), None)
    else:
        raise TypeError(
            f"cannot train on a batch of type {type(batch).__name__} with a loss_fn: batches are "
            "(x, ..., y) tuples or dicts; give a step_fn(model, batch) -> loss for anything else"
        )
    loss = out.loss
    src = "step_fn" if step_fn is not None else "loss_fn" if loss_fn is not None else \
        "the model's loss"
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{src} must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"{src} must return a scalar, got a tensor of shape {tuple(loss.shape)} "
            "(did you forget reduction='mean'?)"
        )
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise UserError(not_attached_message(src, step if step is not None else None))
    return out


def _accuracy(pred: Any, y: Any) -> torch.Tensor | None:
    if not (isinstance(pred, torch.Tensor) and isinstance(y, torch.Tensor)):
        return None
    if y.dtype in (torch.int64, torch.int32) and pred.dim() == 2 and y.dim() == 1 \
            and pred.shape[0] == y.shape[0]:
        return (pred.argmax(1) == y).float().mean()
    return None


# --- the trivial baseline ------------------------------------------------------------------------
def _class_dim(pred: torch.Tensor, y: torch.Tensor) -> int | None:
    """Where the class logits sit in ``pred`` for integer targets ``y`` (``None``: no match)."""
    if pred.dim() == y.dim() + 1:
        if pred.shape[:-1] == y.shape:
            return pred.dim() - 1
        if pred.shape[0] == y.shape[0] and pred.shape[2:] == y.shape[1:]:
            return 1
    return None


class TrivialBaseline:
    """The loss of the best *constant* prediction, estimated from the batches a run trains on.

    Classification (integer targets, a class dimension in the prediction): candidates are the
    log label frequencies (their cross-entropy is the entropy of the labels, the best constant)
    and uniform logits (ln C). Regression (floating targets): the target mean (its squared error
    is the target variance) and, for targets in [0, 1], its logit (binary cross-entropy). Each
    candidate is scored with the run's own loss (``loss_fn``; the model's internal loss is
    cross-entropy / squared error in Hugging Face's convention) on the first batches kept, and
    the lowest is the baseline. Label ``-100`` (Hugging Face's ignore index) and out-of-range
    labels are left out of the frequencies.
    """

    #: Batches kept to score the candidates on.
    KEEP = 4

    def __init__(self, loss_fn: LossFn | None) -> None:
        self.loss_fn = loss_fn
        self.kind: str | None = None
        self.n_classes = 0
        self.counts: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.n = 0
        self.kept: list[tuple[torch.Tensor, Any, Any]] = []  # (pred template, target, batch)
        self.reason: str | None = None

    def update(self, out: StepOutput, batch: Any) -> None:
        """Add one batch (cheap: a bincount or two sums)."""
        if self.reason is not None and self.kind is None:
            return
        pred, y = out.pred, out.target
        if not isinstance(pred, torch.Tensor) or not isinstance(y, torch.Tensor):
            self.reason = ("no prediction tensor and target tensor to compare" if out.pred is
                           not None or out.target is not None else
                           "step_fn: the loop sees only the loss")
            return
        pred, y = pred.detach(), y.detach()
        if self.kind is None:
            cd = _class_dim(pred, y) if not y.is_floating_point() else None
            if cd is not None:
                self.kind, self.n_classes = "classification", int(pred.shape[cd])
            elif y.is_floating_point() and pred.is_floating_point():
                self.kind = "regression"
            else:
                self.reason = (f"targets of dtype {y.dtype} and shape {tuple(y.shape)} do not "
                               f"match a prediction of shape {tuple(pred.shape)}")
                return
        # sums stay on the targets' device: no host sync per step
        if self.kind == "classification":
            v = y.reshape(-1).long()
            v = v[(v >= 0) & (v < self.n_classes)]
            if self.counts is None or self.counts.device != v.device:
                self.counts = torch.zeros(self.n_classes, dtype=torch.float64, device=v.device) \
                    if self.counts is None else self.counts.to(v.device)
            self.counts += torch.bincount(v, minlength=self.n_classes).double()
        else:
            yf = y.double()
            flat = yf.reshape(yf.shape[0], -1) if yf.dim() else yf.reshape(1, 1)
            if self.sum is None or self.sum.shape != flat.shape[1:]:
                if self.sum is not None:  # the per-output shape changed: pool everything
                    self.n *= self.sum.numel()
                    flat = flat.reshape(-1, 1)
                self.sum = torch.zeros(flat.shape[1:], dtype=torch.float64, device=flat.device) \
                    if self.sum is None else self.sum.sum().reshape(1)
                self.sumsq = torch.zeros_like(self.sum) if self.sumsq is None \
                    else self.sumsq.sum().reshape(1)
            self.sum += flat.sum(0).to(self.sum.device)
            assert self.sumsq is not None
            self.sumsq += flat.square().sum(0).to(self.sumsq.device)
            self.n += flat.shape[0]
        if len(self.kept) < self.KEEP:
            # only the prediction's shape and dtype matter: the candidates are constants
            self.kept.append((torch.empty_like(pred), y, batch))

    def _candidates(self, template: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        dev, dt = template.device, template.dtype
        if self.kind == "classification":
            assert self.counts is not None
            total = float(self.counts.sum())
            if total == 0:
                return []
            cd = _class_dim(template, y)
            if cd is None:
                return []
            logp = torch.log(self.counts / total).clamp_min(-1e4).to(dev, dt)
            shape = [1] * template.dim()
            shape[cd] = self.n_classes
            return [logp.reshape(shape).expand_as(template).contiguous(),
                    torch.zeros_like(template)]
        assert self.sum is not None and self.n > 0
        mean = (self.sum / self.n).to(dev, dt)
        if mean.numel() > 1 and template.shape[1:].numel() == mean.numel():
            c = mean.reshape((1, *template.shape[1:])).expand_as(template).contiguous()
        else:
            c = torch.full_like(template, float(mean.mean()))
        cands = [c]
        ymin, ymax = float(y.min()), float(y.max())
        if ymin >= 0 and ymax <= 1:
            p = c.clamp(1e-6, 1 - 1e-6)
            cands.append(torch.log(p) - torch.log1p(-p))
        return cands

    def _score(self, cand: torch.Tensor, y: torch.Tensor, batch: Any) -> float:
        if self.loss_fn is not None:
            target = batch if isinstance(batch, Mapping) and set(batch) != {"x", "y"} else y
            return float(self.loss_fn(cand, target))
        if self.kind == "classification":
            cd = _class_dim(cand, y)
            logits = cand.movedim(cd, -1).reshape(-1, self.n_classes) if cd is not None else cand
            return float(nn.functional.cross_entropy(logits.float(), y.reshape(-1).long(),
                                                     ignore_index=-100))
        return float(nn.functional.mse_loss(cand.float().reshape(y.shape) if cand.numel() ==
                                            y.numel() else cand.float(), y.float()))

    def value(self) -> float:
        """The baseline loss (NaN when it cannot be computed; :attr:`reason` then says why)."""
        if self.kind is None or not self.kept:
            self.reason = self.reason or "no batch seen"
            return math.nan
        scores = []
        with torch.no_grad():
            for template, y, batch in self.kept:
                best = math.inf
                for cand in self._candidates(template, y):
                    try:
                        v = self._score(cand, y, batch)
                    except Exception as e:  # the user's loss rejects a constant prediction
                        self.reason = f"{type(e).__name__} scoring a constant prediction: {e}"
                        continue
                    if math.isfinite(v):
                        best = min(best, v)
                if math.isfinite(best):
                    scores.append(best)
        if not scores:
            self.reason = self.reason or "no finite loss for a constant prediction"
            return math.nan
        self.reason = None
        return float(sum(scores) / len(scores))

    def describe(self) -> str:
        """One phrase saying what the baseline is."""
        if self.kind == "classification":
            return (f"best constant prediction over {self.n_classes} classes (entropy of the "
                    f"label frequencies; ln {self.n_classes} = {math.log(self.n_classes):.4g} "
                    "when balanced)")
        if self.kind == "regression":
            return "best constant prediction (the target mean: loss = target variance for MSE)"
        return f"unknown ({self.reason})"


# --- divergence ----------------------------------------------------------------------------------
def divergence_reason(
    loss: float, initial_loss: float | None, grads_finite: bool = True,
    diverge_factor: float | None = DIVERGE_FACTOR,
) -> str | None:
    """The one divergence policy: ``"nonfinite"`` for a non-finite loss or gradient,
    ``"loss_bound"`` for a loss above ``diverge_factor x max(initial_loss, 1)``, else ``None``."""
    if not math.isfinite(loss) or not grads_finite:
        return "nonfinite"
    if diverge_factor is not None and initial_loss is not None and math.isfinite(initial_loss) \
            and loss > diverge_factor * max(initial_loss, 1.0):
        return "loss_bound"
    return None


def _grads_finite(params: Sequence[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    total = torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()
    return bool(torch.isfinite(total))


# --- result ------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """What one training run produced (the one result type of the package's loops).

    Attributes:
        record: The probe's record (empty when not probed).
        losses: Loss at every optimiser step (the mean over an accumulation window; the last one
            may be NaN/Inf on divergence).
        diverged: Whether the run stopped by the divergence policy (:func:`divergence_reason`).
        diverged_step: The step at which it did.
        steps: Steps completed (including a diverging one).
        wall_time: Seconds of training (excluding model construction).
        model: The trained model (``None`` for a member of a batched population that was not
            exported as a module).
        extra: Anything else (e.g. ``skipped_steps`` of a GradScaler).
        diverged_reason: ``"nonfinite"``, ``"loss_bound"`` or ``None``.
        interrupted: Ctrl-C stopped the run; everything above covers the steps done.
        trivial_loss: The loss of the best constant prediction (:class:`TrivialBaseline`; NaN
            when unknown).
        trivial_kind: What that baseline is, in words.
    """

    record: Record
    losses: list[float]
    diverged: bool
    diverged_step: int | None
    steps: int
    wall_time: float
    model: nn.Module | None
    extra: dict[str, Any] = field(default_factory=dict)
    diverged_reason: str | None = None
    interrupted: bool = False
    trivial_loss: float = math.nan
    trivial_kind: str = ""

    @property
    def final_loss(self) -> float:
        """Mean of the last ``min(10, steps)`` losses (NaN when diverged)."""
        if self.diverged:
            return math.nan
        return stats.final_loss(self.losses)

    @property
    def initial_loss(self) -> float:
        """The first step's loss (NaN when no step ran)."""
        return self.losses[0] if self.losses else math.nan

    @property
    def grad_ratio(self) -> float:
        """:func:`signalprop.stats.grad_ratio` of the record."""
        return stats.grad_ratio(self.record)

    @property
    def beats_trivial(self) -> bool | None:
        """Whether the final loss is below the trivial baseline (``None`` when either is
        unknown); see :func:`signalprop.stats.beats_trivial`."""
        return stats.beats_trivial(self.final_loss, self.trivial_loss)


#: The name this type had before the loops were merged.
TrainResult = FitResult


def _build_probe(
    probe: bool | Probe | dict[str, Any] | None, model: nn.Module, schedule: Any,
    opts: list[torch.optim.Optimizer], scaler: Any,
) -> Probe | None:
    """The run's probe, bound to its optimisers (and scaler): the probe's own hooks then see
    every step boundary, the gradients before clipping, and the steps a scaler skips."""
    if probe is None or probe is False:
        return None
    if isinstance(probe, Probe):
        probe.optimizer = opts
        if scaler is not None and getattr(probe, "scaler", None) is None:
            probe.scaler = scaler
        return probe
    kw = dict(probe) if isinstance(probe, dict) else {}
    if schedule is not None:
        kw.setdefault("schedule", schedule)
    kw["optimizer"] = opts
    if scaler is not None:
        kw.setdefault("scaler", scaler)
    return Probe(model, **kw)


def fit(
    model: nn.Module,
    data: DataLike,
    loss_fn: LossFn | None = None,
    *,
    step_fn: StepFn | None = None,
    steps: int = 200,
    optimizer: OptimizerSpec | Sequence[torch.optim.Optimizer] = "sgd",
    lr: float = 0.1,
    optimizer_kwargs: dict[str, Any] | None = None,
    batch_size: int = 64,
    probe: bool | Probe | dict[str, Any] | None = True,
    schedule: Any = None,
    clip: float | None = None,
    grad_transform: Callable[[nn.Module], Any] | None = None,
    warmup: int = 0,
    scaler: Any = None,
    amp: bool | torch.dtype = False,
    accumulate: int = 1,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
    diverge_factor: float | None = DIVERGE_FACTOR,
    progress: Callable[[int, float], None] | None = None,
    callback: Callable[[int, nn.Module, float], None] | None = None,
    keep_partial: bool = False,
) -> FitResult:
    """Train ``model`` for ``steps`` optimiser steps, optionally probed.

    Args:
        model: The model (trained in place and returned in the result).
        data: A DataLoader / iterable of batches, a tuple of tensors ``(x, ..., y)``, a dict of
            tensors, or a ``Dataset``; batches are ``(x, ..., y)`` tuples or dicts (see the
            module docstring).
        loss_fn: ``loss_fn(prediction, y)`` (tuple batches) or ``loss_fn(prediction, batch)``
            (dict batches) returning a scalar; ``None``: the model returns its loss.
        step_fn: ``step_fn(model, batch) -> loss`` replaces the forward pass and ``loss_fn``.
        steps: Optimiser steps; the data is cycled as needed.
        optimizer: A registered name, a factory ``f(params, lr=...)``, an instance, or a list of
            instances stepped together.
        lr: Learning rate for names and factories (the peak rate with ``warmup``).
        optimizer_kwargs: Extra keyword arguments for the optimiser.
        batch_size: Used for tensors in memory and ``Dataset``.
        probe: ``True`` (a default probe), a ``Probe`` (driven by this loop), a dict of
            ``Probe`` kwargs, or ``None``/``False``.
        schedule: Which steps the probe records (a ``Probe`` schedule: int, list, callable).
        clip: Clip the global gradient norm at this value (the probe records the norms before).
        grad_transform: Called with the model between ``backward()`` and ``optimizer.step()``
            (e.g. a clipping transform from :mod:`signalprop.remedies`).
        warmup: Linear learning-rate warm-up over this many steps.
        scaler: A ``torch.amp.GradScaler`` (or ``True`` for a new one on ``device``): losses are
            scaled, gradients unscaled before they are measured or clipped, and steps the scaler
            skips are counted in ``extra["skipped_steps"]`` (not divergence).
        amp: Run the forward pass under ``torch.autocast`` (``True``: float16 on CUDA, bfloat16
            on the CPU; or a dtype).
        accumulate: Micro-batches per optimiser step (the loss is averaged over the window).
        device: Where to train.
        seed: Seeds torch's global RNG (data order, dropout) when not ``None``.
        diverge_factor: The loss bound of the divergence policy (``None``: non-finite only).
        progress: Optional callback ``(step, loss)`` after each step.
        callback: Optional ``(step, model, loss)`` after each optimiser step.
        keep_partial: On an error in the user's code mid-run (a ``UserError``), stop and return
            what was trained with the error under ``extra["stopped"]`` instead of raising. A data
            source that ends early (a generator) always returns the steps trained, with
            ``extra["data_ended"]``.

    Raises:
        ValueError: no parameters, bad loss (non-scalar), bad data shapes, bad settings.
        TypeError: a loss function, batch or data of the wrong kind.
    """
    params = _check_fit_args(model, loss_fn, step_fn, steps, accumulate)
    if seed is not None:
        torch.manual_seed(seed)
    device = torch.device(device)
    model.to(device)
    model.train()
    opts = make_optimizers(optimizer, model, lr, **(optimizer_kwargs or {}))
    base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]
    if scaler is True:
        scaler = torch.amp.GradScaler(device.type)
    amp_dtype = _amp_dtype(amp, device)

    p = _build_probe(probe, model, schedule, opts, scaler)
    baseline = TrivialBaseline(loss_fn) if step_fn is None else None
    source = as_batches(data, batch_size=batch_size, seed=seed or 0)
    it = source()
    losses: list[float] = []
    reason: str | None = None
    diverged_step: int | None = None
    interrupted = False
    skipped = 0
    extra: dict[str, Any] = {}

    def next_batch(step: int) -> Any:
        nonlocal it
        try:
            with user_code("data", step):
                return next(it)
        except StopIteration:
            it = source()
            try:
                with user_code("data", step):
                    return next(it)
            except StopIteration:
                if losses:  # a one-shot source (a generator) ran out: keep what was trained
                    raise _DataEnded from None
                raise ValueError("the data yielded no batches") from None

    t0 = time.perf_counter()
    if p is not None:
        p.attach()
    # the step stays in one piece on purpose: the order of its events (backward, unscale,
    # measure, clip, step, scaler update) is the contract with the probe's hooks
    try:
        for step in range(steps):
            if warmup > 0:
                f = min(1.0, (step + 1) / warmup)
                for o, lrs in zip(opts, base_lrs, strict=True):
                    for g, b in zip(o.param_groups, lrs, strict=True):
                        g["lr"] = b * f
            for o in opts:
                o.zero_grad(set_to_none=True)
            total = 0.0
            last: StepOutput | None = None
            for _ in range(accumulate):
                batch = to_device(next_batch(step), device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    last = forward_loss(model, batch, loss_fn, step_fn, step=step)
                loss = last.loss / accumulate if accumulate > 1 else last.loss
                with user_code("backward", step):
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                micro = last.loss.detach()
                total += float(micro)
                if p is not None and p.recording:
                    p.log(loss=micro)  # the probe averages over the accumulation window
                if baseline is not None:
                    baseline.update(last, batch)
            lv = total / accumulate
            if p is not None and p.recording and last is not None:
                acc = _accuracy(last.pred, last.target)
                if acc is not None:
                    p.log(accuracy=acc)
            if scaler is not None:
                for o in opts:
                    scaler.unscale_(o)
            finite = _grads_finite(params)
            losses.append(lv)
            if scaler is not None and math.isfinite(lv) and not finite:
                # the scaler skips this step and lowers its scale: an outcome of mixed
                # precision, not divergence (the probe records it as a skipped step)
                scale = scaler.get_scale()
                for o in opts:
                    scaler.step(o)
                scaler.update()
                skipped += int(scaler.get_scale() < scale)
                continue
            reason = divergence_reason(lv, losses[0], finite, diverge_factor)
            if reason is not None:
                diverged_step = step
                if p is not None:
                    # finalise this step's statistics (NaNs counted) without stepping weights
                    p.gradients_ready()
                    p.stepped(update_ratios=False)
                break
            if grad_transform is not None:
                grad_transform(model)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            for o in opts:  # the probe's optimiser hooks close its step
                if scaler is not None:
                    scaler.step(o)
                else:
                    o.step()
            if scaler is not None:
                scaler.update()
            if progress is not None:
                progress(step, lv)
            if callback is not None:
                callback(step, model, lv)
    except KeyboardInterrupt:
        interrupted = True
    except _DataEnded:
        extra["data_ended"] = len(losses)
    except UserError as e:
        # an error in the user's code mid-run: with keep_partial the caller gets what was
        # trained (and decides what to say); the steps before this one are complete
        if not keep_partial or not losses:
            raise
        extra["stopped"] = e
    finally:
        if p is not None:
            p.detach()
    wall = time.perf_counter() - t0
    if reason is None and not interrupted and losses and not all(
        bool(torch.isfinite(q).all()) for q in params
    ):
        reason, diverged_step = "nonfinite", len(losses) - 1
    record = p.record if p is not None else Record()
    trivial = baseline.value() if baseline is not None else math.nan
    trivial_kind = baseline.describe() if baseline is not None else \
        "unknown (step_fn: the loop sees only the loss)"
    _write_meta(record, optimizer, lr, losses, reason, diverged_step, diverge_factor,
                interrupted, trivial, trivial_kind, skipped)
    return FitResult(record, losses, reason is not None, diverged_step, len(losses), wall, model,
                     {"skipped_steps": skipped, **extra}, reason, interrupted, trivial,
                     trivial_kind)


def _check_fit_args(
    model: Any, loss_fn: Any, step_fn: Any, steps: int, accumulate: int
) -> list[nn.Parameter]:
    """Refuse bad arguments before anything runs; the model's trainable parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = _trainable(model)
    if not params:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if step_fn is not None and not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    return params


def _amp_dtype(amp: bool | torch.dtype, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``True`` is float16 on CUDA and bfloat16 elsewhere."""
    if amp is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return amp if isinstance(amp, torch.dtype) else None


def _write_meta(
    record: Record, optimizer: Any, lr: float, losses: list[float], reason: str | None,
    diverged_step: int | None, diverge_factor: float | None, interrupted: bool, trivial: float,
    trivial_kind: str, skipped: int,
) -> None:
    """What the diagnosis reads about the run, in ``record.meta``."""
    meta = record.meta
    meta.setdefault("optimizer", optimizer_name(optimizer))
    meta.setdefault("lr", lr)
    meta.update(steps=len(losses), diverged_step=diverged_step, diverged_reason=reason,
                diverge_factor=diverge_factor, interrupted=interrupted, trivial_loss=trivial,
                trivial_kind=trivial_kind)
    if reason is not None and losses:
        meta["diverged_loss"] = losses[-1]
        meta["initial_loss"] = losses[0]
    if skipped:
        meta["skipped_steps"] = skipped

def train(
    model: nn.Module,
    data: DataLike,
    loss_fn: LossFn | None = None,
    **kwargs: Any,
) -> FitResult:
    """The former name of :func:`fit` (same arguments). As before the loops were merged, only
    non-finite values stop it unless ``diverge_factor`` is given."""
    kwargs.setdefault("diverge_factor", None)
    return fit(model, data, loss_fn, **kwargs)
