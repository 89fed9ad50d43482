"""The loop itself, :func:`fit`, shared by ``doctor``, ``trial``, the lab and the examples; its
steps are the methods of :class:`_Run`, called in the order that is the probe's contract."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from signalprop.errors import UserError, user_code
from signalprop.probe import Probe
from signalprop.record import Record
from signalprop.train.baseline import TrivialBaseline
from signalprop.train.batches import (
    DataLike,
    LossFn,
    StepFn,
    StepOutput,
    _accuracy,
    as_batches,
    forward_loss,
    to_device,
)
from signalprop.train.optim import OptimizerSpec, _trainable, make_optimizers, optimizer_name
from signalprop.train.result import DIVERGE_FACTOR, FitResult, _grads_finite, divergence_reason


class _DataEnded(Exception):
    """A one-shot data source ran out after some steps (internal signal of :func:`fit`)."""


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


# long: 24 documented arguments take 75 of its lines; the body reads top to bottom in ~45
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
    warm = _WarmUp(opts, warmup)
    if scaler is True:
        scaler = torch.amp.GradScaler(device.type)
    p = _build_probe(probe, model, schedule, opts, scaler)
    run = _Run(model, params, opts, scaler, p, device, _amp_dtype(amp, device), accumulate,
               loss_fn, step_fn, TrivialBaseline(loss_fn) if step_fn is None else None,
               as_batches(data, batch_size=batch_size, seed=seed or 0))
    t0 = time.perf_counter()
    if p is not None:
        p.attach()
    # one step's events keep their order (backward, unscale, measure, clip, step, scaler
    # update): that order is the contract with the probe's hooks
    try:
        for step in range(steps):
            warm(step)
            lv = run.forward_backward(step)
            if run.scaler_skipped(lv):
                continue
            if run.diverged(step, lv, diverge_factor):
                break
            run.update(grad_transform, clip)
            if progress is not None:
                progress(step, lv)
            if callback is not None:
                callback(step, model, lv)
    except KeyboardInterrupt:
        run.interrupted = True
    except _DataEnded:
        run.extra["data_ended"] = len(run.losses)
    except UserError as e:
        # an error in the user's code mid-run: with keep_partial the caller gets what was
        # trained (and decides what to say); the steps before this one are complete
        if not keep_partial or not run.losses:
            raise
        run.extra["stopped"] = e
    finally:
        if p is not None:
            p.detach()
    return run.result(time.perf_counter() - t0, optimizer, lr, diverge_factor)


class _WarmUp:
    """Linear learning-rate warm-up over ``warmup`` steps from the optimisers' own rates."""

    def __init__(self, opts: list[torch.optim.Optimizer], warmup: int) -> None:
        self.opts, self.warmup = opts, warmup
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]

    def __call__(self, step: int) -> None:
        if self.warmup <= 0:
            return
        f = min(1.0, (step + 1) / self.warmup)
        for o, lrs in zip(self.opts, self.base_lrs, strict=True):
            for g, b in zip(o.param_groups, lrs, strict=True):
                g["lr"] = b * f


@dataclass
class _Run:
    """The state of one :func:`fit` run and its steps, in the order :func:`fit` calls them."""

    model: nn.Module
    params: list[nn.Parameter]
    opts: list[torch.optim.Optimizer]
    scaler: Any
    probe: Probe | None
    device: torch.device
    amp_dtype: torch.dtype | None
    accumulate: int
    loss_fn: LossFn | None
    step_fn: StepFn | None
    baseline: TrivialBaseline | None
    source: Callable[[], Any]
    losses: list[float] = field(default_factory=list)
    reason: str | None = None
    diverged_step: int | None = None
    interrupted: bool = False
    skipped: int = 0
    finite: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.it = self.source()

    def next_batch(self, step: int) -> Any:
        """The next batch; a re-iterable source starts over when it ends."""
        try:
            with user_code("data", step):
                return next(self.it)
        except StopIteration:
            self.it = self.source()
            try:
                with user_code("data", step):
                    return next(self.it)
            except StopIteration:
                if self.losses:  # a one-shot source (a generator) ran out: keep what was trained
                    raise _DataEnded from None
                raise ValueError("the data yielded no batches") from None

    def forward_backward(self, step: int) -> float:
        """Gradients of one optimiser step (``accumulate`` micro-batches), unscaled and checked
        for finiteness; the step's loss (the mean over the window) is appended and returned."""
        p = self.probe
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        total = 0.0
        last: StepOutput | None = None
        for _ in range(self.accumulate):
            batch = to_device(self.next_batch(step), self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                last = forward_loss(self.model, batch, self.loss_fn, self.step_fn, step=step)
            loss = last.loss / self.accumulate if self.accumulate > 1 else last.loss
            with user_code("backward", step):
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            micro = last.loss.detach()
            total += float(micro)
            if p is not None and p.recording:
                p.log(loss=micro)  # the probe averages over the accumulation window
            if self.baseline is not None:
                self.baseline.update(last, batch)
        lv = total / self.accumulate
        if p is not None and p.recording and last is not None:
            acc = _accuracy(last.pred, last.target)
            if acc is not None:
                p.log(accuracy=acc)
        if self.scaler is not None:
            for o in self.opts:
                self.scaler.unscale_(o)
        self.finite = _grads_finite(self.params)
        self.losses.append(lv)
        return lv

    def scaler_skipped(self, lv: float) -> bool:
        """A finite loss with non-finite gradients under a scaler: the scaler skips the step and
        lowers its scale, an outcome of mixed precision, not divergence (the probe records it as
        a skipped step)."""
        if self.scaler is None or not math.isfinite(lv) or self.finite:
            return False
        scale = self.scaler.get_scale()
        for o in self.opts:
            self.scaler.step(o)
        self.scaler.update()
        self.skipped += int(self.scaler.get_scale() < scale)
        return True

    def diverged(self, step: int, lv: float, diverge_factor: float | None) -> bool:
        """Apply the divergence policy; on divergence the probe finalises this step's statistics
        (NaNs counted) without the weights being stepped."""
        self.reason = divergence_reason(lv, self.losses[0], self.finite, diverge_factor)
        if self.reason is None:
            return False
        self.diverged_step = step
        if self.probe is not None:
            self.probe.gradients_ready()
            self.probe.stepped(update_ratios=False)
        return True

    def update(self, grad_transform: Callable[[nn.Module], Any] | None,
               clip: float | None) -> None:
        """Transform and clip the gradients, then step (the probe's optimiser hooks close its
        step)."""
        if grad_transform is not None:
            grad_transform(self.model)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        for o in self.opts:
            if self.scaler is not None:
                self.scaler.step(o)
            else:
                o.step()
        if self.scaler is not None:
            self.scaler.update()

    def result(self, wall: float, optimizer: Any, lr: float,
               diverge_factor: float | None) -> FitResult:
        """The run's :class:`FitResult`, its record's meta written; parameters that went
        non-finite in the last step count as divergence."""
        losses = self.losses
        if self.reason is None and not self.interrupted and losses and not all(
            bool(torch.isfinite(q).all()) for q in self.params
        ):
            self.reason, self.diverged_step = "nonfinite", len(losses) - 1
        record = self.probe.record if self.probe is not None else Record()
        b = self.baseline
        trivial = b.value() if b is not None else math.nan
        trivial_kind = b.describe() if b is not None else \
            "unknown (step_fn: the loop sees only the loss)"
        _write_meta(record, optimizer, lr, losses, self.reason, self.diverged_step,
                    diverge_factor, self.interrupted, trivial, trivial_kind, self.skipped)
        return FitResult(record, losses, self.reason is not None, self.diverged_step,
                         len(losses), wall, self.model,
                         {"skipped_steps": self.skipped, **self.extra}, self.reason,
                         self.interrupted, trivial, trivial_kind)


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
