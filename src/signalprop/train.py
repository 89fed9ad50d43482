"""A plain, instrumented training loop shared by ``doctor`` and ``trial``.

Divergence is an outcome, not a crash: a non-finite loss or gradient stops the run, the step is
recorded (with the probe's statistics of that step, NaNs counted) and :class:`TrainResult` says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from signalprop.data import Dataset
from signalprop.probe import Probe
from signalprop.record import Record
from signalprop.remedies.optimizers import OPTIMIZERS
from signalprop.validation import (
    UserError,
    check_batch_size,
    check_loss,
    explain_forward_error,
    explain_loss_error,
    user_code,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DataLike = Any  # DataLoader | (x, y) | Dataset | iterable of (x, y)

OptimizerSpec = str | torch.optim.Optimizer | Callable[..., torch.optim.Optimizer]


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
        return fn(model.parameters(), lr=lr, **kw)
    if callable(spec):
        return spec(model.parameters(), lr=lr, **kwargs)
    raise TypeError(
        f"optimizer must be a name, a torch.optim.Optimizer or a factory, got {type(spec).__name__}"
    )


def as_batches(
    data: DataLike, batch_size: int = 64, seed: int = 0
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Normalise supported data forms to a re-iterable source of (x, y) mini-batches."""
    check_batch_size(batch_size)
    if isinstance(data, Dataset):
        data = data.loader(batch_size=batch_size, shuffle=True, seed=seed)
    if isinstance(data, tuple | list) and len(data) == 2 and all(
        isinstance(t, torch.Tensor) for t in data
    ):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"inputs and targets disagree on the number of examples: {x.shape[0]} vs {y.shape[0]}"
            )
        if x.shape[0] == 0:
            raise ValueError("the data set is empty")
        g = torch.Generator().manual_seed(seed)

        def gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0], batch_size):
                j = perm[i : i + batch_size]
                yield x[j], y[j]

        return gen
    if isinstance(data, Iterable) and not isinstance(data, str | bytes | torch.Tensor):
        return lambda: iter(data)  # type: ignore[arg-type]
    raise TypeError(
        "data must be a DataLoader (or any iterable of (x, y) batches), an (x, y) tensor pair, "
        f"or a signalprop.data.Dataset; got {type(data).__name__}"
    )


def check_finite_data(data: DataLike, max_batches: int | None = None) -> None:
    """Refuse data containing NaN/Inf (raises ``ValueError`` naming the batch and the count)."""
    src = as_batches(data)
    for b, batch in enumerate(src()):
        if max_batches is not None and b >= max_batches:
            break
        x, y = _split_batch(batch)
        for name, t in (("inputs", x), ("targets", y)):
            if t.is_floating_point():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise ValueError(f"data batch {b}: {bad} non-finite value(s) in the {name}")


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        try:
            return batch["x"], batch["y"]
        except KeyError:
            raise TypeError("dict batches need keys 'x' and 'y'") from None
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
    )


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor):
        return None  # e.g. a model returning a tuple that the loss unpacks
    if y.dtype in (torch.int64, torch.int32) and out.dim() == 2 and y.dim() == 1:
        return (out.detach().argmax(1) == y).float().mean()
    return None


@dataclass
class TrainResult:
    """What one training run produced.

    Attributes:
        record: The probe's record (empty when not probed).
        losses: Loss at every step (float; the last one may be NaN/Inf on divergence).
        diverged: Whether the run stopped on a non-finite loss or gradient.
        diverged_step: The step at which it did.
        steps: Steps completed (including a diverging one).
        wall_time: Seconds of training (excluding model construction).
        model: The trained model.
    """

    record: Record
    losses: list[float]
    diverged: bool
    diverged_step: int | None
    steps: int
    wall_time: float
    model: nn.Module
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean of the last ``min(10, steps)`` finite losses (NaN when diverged)."""
        if self.diverged or not self.losses:
            return math.nan
        tail = self.losses[-10:]
        return float(sum(tail) / len(tail))


def train(
    model: nn.Module,
    data: DataLike,
    loss_fn: LossFn,
    *,
    steps: int = 200,
    optimizer: OptimizerSpec = "sgd",
    lr: float = 0.1,
    optimizer_kwargs: dict[str, Any] | None = None,
    batch_size: int = 64,
    probe: bool | Probe | dict[str, Any] | None = True,
    grad_transform: Callable[[nn.Module], Any] | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
    progress: Callable[[int, float], None] | None = None,
    keep_partial: bool = False,
) -> TrainResult:
    """Train ``model`` for ``steps`` mini-batch steps, optionally probed.

    Args:
        model: The model (trained in place and returned in the result).
        data: DataLoader / iterable of (x, y), an (x, y) tensor pair, or a ``Dataset``.
        loss_fn: ``loss_fn(output, target)`` returning a scalar tensor.
        steps: Optimiser steps; the data is cycled as needed.
        optimizer: A registered name, a factory ``f(params, lr=...)`` or an instance.
        lr: Learning rate for names and factories.
        optimizer_kwargs: Extra keyword arguments for the optimiser.
        batch_size: Used for tensor pairs and ``Dataset``.
        probe: ``True`` (a default probe, every step), a configured ``Probe`` (its optimizer must
            be None; it is re-bound here), a dict of ``Probe`` kwargs, or ``None``/``False``.
        grad_transform: Called with the model between ``backward()`` and ``optimizer.step()``
            (e.g. a clipping transform from :mod:`signalprop.remedies`).
        device: Where to train.
        seed: Seeds torch's global RNG for the data order when not ``None``.
        progress: Optional callback ``(step, loss)`` after each step.
        keep_partial: On Ctrl-C or an error in the user's code (``UserError``) mid-run, stop and
            return what was trained, with the exception under ``result.extra["stopped"]``
            (the caller decides what to do with it), instead of raising.

    Raises:
        ValueError: no parameters, bad loss (non-scalar), bad data shapes.
        TypeError: a loss function or data of the wrong kind.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if seed is not None:
        torch.manual_seed(seed)
    device = torch.device(device)
    model.to(device)
    model.train()
    opt = make_optimizer(optimizer, model, lr, **(optimizer_kwargs or {}))

    p: Probe | None
    if probe is True:
        p = Probe(model, optimizer=opt)
    elif isinstance(probe, dict):
        p = Probe(model, optimizer=opt, **probe)
    elif isinstance(probe, Probe):
        p = probe
        if p.optimizer is None:
            p.optimizer = opt
    else:
        p = None

    source = as_batches(data, batch_size=batch_size, seed=seed or 0)
    it = source()
    losses: list[float] = []
    diverged, diverged_step = False, None
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if p is not None:
        p.attach()
    try:
        for step in range(steps):
            try:
                with user_code("data", step):
                    batch = next(it)
            except StopIteration:
                it = source()
                try:
                    with user_code("data", step):
                        batch = next(it)
                except StopIteration:
                    if losses:  # a one-shot source (generator) ran out: keep what was trained
                        extra["data_ended"] = step
                        break
                    raise ValueError("the data yielded no batches") from None
            x, y = _split_batch(batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with user_code("forward", step, explain=lambda e, x=x: explain_forward_error(model, x)):
                out = model(x)
            with user_code("loss", step, explain=explain_loss_error(out, y)):
                loss = loss_fn(out, y)
            check_loss(loss, step)
            with user_code("backward", step):
                loss.backward()
            if p is not None and p.recording:
                acc = _accuracy(out, y)
                p.log(loss=loss) if acc is None else p.log(loss=loss, accuracy=acc)
            lv = float(loss.detach())
            losses.append(lv)
            if not math.isfinite(lv) or not _grads_finite(model):
                diverged, diverged_step = True, step
                if p is not None:
                    # finalise this step's statistics (NaNs counted) without stepping weights
                    p.gradients_ready()
                    p.stepped(update_ratios=False)
                break
            if grad_transform is not None:
                grad_transform(model)
            opt.step()
            if p is not None and p.optimizer is not opt:
                p.step()
            if progress is not None:
                progress(step, lv)
    except (KeyboardInterrupt, UserError) as e:
        if not keep_partial:
            raise
        extra["stopped"] = e  # the steps before this one are complete and recorded
    finally:
        if p is not None:
            p.detach()
    wall = time.perf_counter() - t0
    record = p.record if p is not None else Record()
    record.meta.setdefault("optimizer", optimizer if isinstance(optimizer, str) else type(opt).__name__)
    record.meta.setdefault("lr", lr)
    record.meta["steps"] = len(losses)
    record.meta["diverged_step"] = diverged_step
    return TrainResult(record, losses, diverged, diverged_step, len(losses), wall, model, extra)


def _grads_finite(model: nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    total = torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()
    return bool(torch.isfinite(total))
