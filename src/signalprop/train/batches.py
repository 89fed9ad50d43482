"""Batches and the forward pass under the loop's rules (see :mod:`signalprop.train`).

Data forms become re-iterable sources of mini-batches (:func:`as_batches`); a batch goes to the
device (:func:`to_device`) and through the model and the loss (:func:`forward_loss`), whose
prediction and targets the trivial baseline and the accuracy read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from signalprop.data import Dataset
from signalprop.errors import (
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

#: Keys under which a dict batch carries its targets (first match wins).
TARGET_KEYS: tuple[str, ...] = ("labels", "label", "y", "targets", "target")


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
    """Run ``model`` on ``batch`` and compute the loss under the rules of
    :mod:`signalprop.train`.

    Exceptions raised inside the user's forward, loss or ``step_fn`` come out as
    :class:`signalprop.validation.UserCodeError` naming the step (or ``when``) and the file:line.

    Raises:
        TypeError: a batch form that needs a loss function, a loss that is not a tensor.
        ValueError: a loss that is not a scalar or not attached to the graph (while gradients
            are enabled).
    """
    if step_fn is not None:
        with user_code("step_fn", step, when=when):
            out = StepOutput(step_fn(model, batch))
    else:
        out = _model_step(model, batch, loss_fn, step, when)
    src = "step_fn" if step_fn is not None else "loss_fn" if loss_fn is not None else \
        "the model's loss"
    _check_loss(out.loss, src, step)
    return out


def _model_step(
    model: nn.Module, batch: Any, loss_fn: LossFn | None, step: int | None, when: str,
) -> StepOutput:
    """The forward pass and the loss for each batch form (see the module docstring)."""

    def fwd(*args: Any, **kw: Any) -> Any:
        first = args[0] if args else next(iter(kw.values()), None)
        with user_code("forward", step, explain=lambda e: explain_forward_error(model, first),
                       when=when):
            return model(*args, **kw)

    def lossf(pred: Any, y: Any) -> Any:
        assert loss_fn is not None
        with user_code("loss", step, explain=explain_loss_error(pred, y, loss_fn), when=when):
            return loss_fn(pred, y)

    if isinstance(batch, Mapping):
        if set(batch) == {"x", "y"} and loss_fn is not None:
            # the legacy {"x": ..., "y": ...} batch of a plain model
            o = fwd(batch["x"])
            pred = prediction(o)
            return StepOutput(lossf(pred, batch["y"]), pred, batch["y"])
        o = fwd(**batch)
        pred = prediction(o)
        loss = model_loss(o) if loss_fn is None else lossf(pred, batch)
        return StepOutput(loss, pred, target_of(batch))
    if isinstance(batch, (tuple, list)):
        if loss_fn is None:
            o = fwd(*batch)
            return StepOutput(model_loss(o), prediction(o), target_of(batch))
        if len(batch) < 2:
            raise TypeError(
                "a tuple batch needs inputs and targets (x, ..., y) when a loss_fn is given"
            )
        o = fwd(*batch[:-1])
        pred = prediction(o)
        return StepOutput(lossf(pred, batch[-1]), pred, batch[-1])
    if isinstance(batch, torch.Tensor) and loss_fn is None:
        o = fwd(batch)
        return StepOutput(model_loss(o), prediction(o), None)
    raise TypeError(
        f"cannot train on a batch of type {type(batch).__name__} with a loss_fn: batches are "
        "(x, ..., y) tuples or dicts; give a step_fn(model, batch) -> loss for anything else"
    )


def _check_loss(loss: Any, src: str, step: int | None) -> None:
    """Refuse a loss that is not a scalar tensor attached to the graph (``src`` says whose)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{src} must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"{src} must return a scalar, got a tensor of shape {tuple(loss.shape)} "
            "(did you forget reduction='mean'?)"
        )
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise UserError(not_attached_message(src, step))


def _accuracy(pred: Any, y: Any) -> torch.Tensor | None:
    if not (isinstance(pred, torch.Tensor) and isinstance(y, torch.Tensor)):
        return None
    if y.dtype in (torch.int64, torch.int32) and pred.dim() == 2 and y.dim() == 1 \
            and pred.shape[0] == y.shape[0]:
        return (pred.argmax(1) == y).float().mean()
    return None
