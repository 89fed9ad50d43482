"""Hugging Face ``transformers``: :class:`SignalpropCallback` probes the model during
``Trainer.train``, sends summary scalars through the Trainer's own logging path (so every
``report_to`` backend receives them), warns once per diagnosis finding, and writes the record,
its findings and the doctor's HTML report at the end.

    from signalprop.integrations.transformers import SignalpropCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[SignalpropCallback()])
    trainer.train()

Needs the ``[transformers]`` extra (``transformers`` and ``accelerate``).

Where the gradients are measured. The Trainer clips gradients (``max_grad_norm``) *before* it
fires ``on_pre_optimizer_step``, so no callback event sees the raw gradients. The probe itself
reads them at the end of every backward pass (a post-accumulate-grad hook on each parameter
queues its read behind autograd's other end-of-backward callbacks, DDP's all-reduce included):
the last micro-batch's backward leaves the accumulated, unclipped gradient. At
``on_pre_optimizer_step`` the callback closes the probe's step from those norms (``grad_norm``,
``grad_norm_total``; ``out_grad_norm`` comes from the backward hooks). After ``optimizer.step``
(``on_optimizer_step``) the gradients hold the clipped values: their global norm is recorded as
``grad_norm_total_clipped`` and the update ratios ``||dW|| / ||W||`` are computed.

Record step ``k`` is the ``k``-th optimiser step (``state.global_step`` while its gradients were
accumulated), whatever ``gradient_accumulation_steps`` is. The recorded ``loss`` is the mean of
the model's ``loss`` output over the micro-batches of the window. Under fp16 with a gradient
scaler the gradient metrics are divided by the loss scale.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from signalprop import stats
from signalprop._optional import require
from signalprop.integrations.common import (
    FindingWarner,
    SignalpropWarning,
    set_callback_core,
    summary_metrics,
    write_outputs,
)
from signalprop.integrations.distributed import install_reducer
from signalprop.probe import Probe
from signalprop.probe.schedule import Schedule
from signalprop.record import MODEL

_tc = require("transformers.trainer_callback", "transformers", "the Hugging Face integration")
TrainerCallback = _tc.TrainerCallback

__all__ = ["CLIPPED_NORM", "TRAINER_NORM", "SignalpropCallback", "SignalpropWarning"]

#: MODEL metric: the global gradient norm after the Trainer's clipping.
CLIPPED_NORM = "grad_norm_total_clipped"
#: MODEL metric: the Trainer's own pre-clip ``grad_norm`` from its logs, at the same step.
TRAINER_NORM = "trainer_grad_norm"
#: metrics that scale with the loss (divided by the fp16 loss scale)
_GRAD_METRICS = ("grad_norm", "grad_norm_total", "out_grad_norm")


class SignalpropCallback(TrainerCallback):
    """Probe a model during ``Trainer.train`` (see the module docstring).

    Args:
        every: Record every ``every`` optimiser steps (ignored when ``schedule`` is given).
        diagnose_every: Diagnose the record so far every this many optimiser steps (and at the
            end); ``None`` or 0: only at the end. New findings become
            :class:`~signalprop.integrations.common.SignalpropWarning` warnings, once each.
        out_dir: Where ``record.json.gz``, ``findings.json`` and ``report.html`` go at the end
            (default ``<args.output_dir>/signalprop``).
        save: Write those files (process 0 only).
        schedule: A probe schedule overriding ``every``.
        log_summary: Add the summary scalars of the latest recorded step
            (``signalprop/grad_ratio_first_last`` ...) to the Trainer's logs.
        warn: Emit findings as warnings.
        thresholds: Passed to :func:`signalprop.diagnosis.diagnose`.
        probe_kwargs: Extra :class:`~signalprop.probe.Probe` arguments (``modules=``,
            ``forward=False`` ...).
        on_record: Listeners ``f(step, values)`` called after each recorded step (e.g. a
            :func:`~signalprop.integrations.wandb.wandb_writer`).
        report: Write the doctor's HTML report.
    """

    def __init__(
        self,
        every: int = 10,
        diagnose_every: int | None = 100,
        out_dir: str | os.PathLike[str] | None = None,
        *,
        save: bool = True,
        schedule: Schedule | Iterable[int] | None = None,
        log_summary: bool = True,
        warn: bool = True,
        thresholds: Any = None,
        probe_kwargs: Mapping[str, Any] | None = None,
        on_record: Iterable[Callable[[int, Mapping[str, Mapping[str, float]]], None]] = (),
        report: bool = True,
    ) -> None:
        set_callback_core(self, every, diagnose_every, out_dir, save, schedule, probe_kwargs,
                          on_record, report)
        self.log_summary = log_summary
        self.warner = FindingWarner(thresholds, warn)

        self.probe: Probe | None  # set by set_callback_core, as are record and schedule
        self._hooks: list[Any] = []
        self._ready = False
        self._loss_sum: torch.Tensor | None
        self._loss_n = 0
        self._optimizer: Any = None
        self._summary: dict[str, float] = {}
        self._summary_step: int | None = None
        self._logged_step: int | None = None
        self._world_zero = True
        self._placed = False

    @property
    def findings(self) -> list[Any]:
        """Findings of the latest diagnosis."""
        return self.warner.findings

    # ---- placement ----------------------------------------------------------------------------
    def _place_first(self) -> None:
        """Move this callback to the front of the Trainer's callback list.

        The Trainer calls ``on_log`` on its callbacks in list order with one shared ``logs``
        dict; reporting callbacks (W&B, MLflow, TensorBoard ...) come before user callbacks,
        so metrics added here would reach none of them. The handler is found on the stack
        (its ``call_event`` is our caller); the list is replaced, not mutated, so the event
        being dispatched finishes over the old list.
        """
        if self._placed:
            return
        frame = sys._getframe(1)
        for _ in range(6):
            if frame is None:
                break
            handler = frame.f_locals.get("self")
            if isinstance(handler, _tc.CallbackHandler):
                cbs = [c for c in handler.callbacks if c is not self]
                handler.callbacks = [self, *cbs]
                self._placed = True
                return
            frame = frame.f_back

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._place_first()

    # ---- set-up / tear-down --------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        self._place_first()  # added with trainer.add_callback after __init__
        if not self._placed and self.log_summary:
            warnings.warn(
                "signalprop: could not find the Trainer's callback handler to run first; the "
                "summary scalars reach state.log_history and the callbacks after this one, "
                "not necessarily every report_to backend", RuntimeWarning, stacklevel=2)
        if model is None:
            raise ValueError("SignalpropCallback: the Trainer passed no model to on_train_begin")
        self._world_zero = bool(state.is_world_process_zero)
        if self.probe is None:
            self.probe = Probe(model, schedule=self.schedule, record=self.record,
                               **self.probe_kwargs)
        p = self.probe
        install_reducer(p, model)  # DDP/FSDP: values combined across ranks before recording
        p.step_index = int(state.global_step)  # a resumed run continues its step count
        p.attach()
        self.warner.model = model
        self._optimizer = optimizer
        self._hooks.append(model.register_forward_hook(self._capture_loss))
        meta = self.record.meta
        meta["source"] = "transformers"
        meta.setdefault("name", type(model).__name__)
        meta.setdefault("data", "Trainer train_dataset")
        meta.setdefault("optimizer", str(getattr(args, "optim", "")) or
                        type(optimizer).__name__.lower())
        meta.setdefault("lr", float(args.learning_rate))
        meta["gradient_accumulation_steps"] = int(args.gradient_accumulation_steps)
        meta["max_grad_norm"] = float(args.max_grad_norm or 0.0)
        self._ready = False
        self._loss_sum, self._loss_n = None, 0

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.probe is None:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.probe.detach()
        self.record.meta["steps_run"] = int(state.global_step)
        if self.record.steps and self.warner.last_step != self.record.steps[-1]:
            self.warner(self.record, emit=self._world_zero)
        if self.save and state.is_world_process_zero and self.record.steps:
            out = self.out_dir or Path(args.output_dir) / "signalprop"
            self.written = write_outputs(out, self.record, self.findings, report=self.report,
                                         explanation=self.warner.explanation)

    # ---- the step ------------------------------------------------------------------------------
    def _capture_loss(self, module: Any, inputs: Any, output: Any) -> None:
        p = self.probe
        if p is None or not p.recording or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            v = loss.detach().float().reshape(())
            self._loss_sum = v if self._loss_sum is None else self._loss_sum + v
            self._loss_n += 1

    def _gradients_ready(self) -> None:
        p = self.probe
        if p is None or self._ready or not p.recording:
            return
        self._ready = True
        if self._loss_sum is not None:
            p.log(loss=self._loss_sum / max(self._loss_n, 1))
        p.gradients_ready()  # every statistic except update ratios, before clipping
        scale = self._loss_scale()
        pending = p.pending()
        if scale is not None and pending is not None:
            for d in pending.values():
                for m in _GRAD_METRICS:
                    if m in d:
                        d[m] = d[m] / scale
        if p.weights:
            p.snapshot_weights()

    def _loss_scale(self) -> float | None:
        scaler = getattr(self._optimizer, "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            return float(scaler.get_scale())
        return None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the window's gradients are final; the probe kept their norms from the end of the
        # last backward, before the Trainer clipped them
        self._gradients_ready()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        p = self.probe
        if p is None:
            return
        step = p.step_index
        pending = p.pending() if self._ready else None
        if pending is not None and p.weights:
            grads = [q.grad for _, q in p.params if q.grad is not None]
            if grads:
                pending.setdefault(MODEL, {})[CLIPPED_NORM] = float(stats.global_norm(grads))
        p.stepped()  # update ratios, commit, advance the step counter
        self._ready = False
        self._loss_sum, self._loss_n = None, 0
        if pending is None or step not in self.record.data:
            return
        values = self.record.data[step]
        self._summary = summary_metrics(values)
        self._summary_step = step
        for f in self.listeners:
            f(step, values)
        if self.diagnose_every is not None and step >= self._next_diagnosis:
            self._next_diagnosis = step + self.diagnose_every
            self.warner(self.record, step, emit=self._world_zero)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs is None:
            return
        step = int(state.global_step) - 1  # logs come after global_step += 1
        if "grad_norm" in logs and step in self.record.data:
            v = logs["grad_norm"]
            self.record.add(step, MODEL, TRAINER_NORM, float(v))
            if step == self._summary_step:
                self._summary["signalprop/" + TRAINER_NORM] = float(v)
        if (self.log_summary and self._summary and "loss" in logs
                and self._logged_step != self._summary_step):
            self._logged_step = self._summary_step
            logs.update(self._summary)
            logs["signalprop/step"] = self._summary_step
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._summary)

    def __repr__(self) -> str:
        return f"SignalpropCallback(schedule={self.schedule}, steps_recorded={len(self.record)})"
