"""PyTorch Lightning: :class:`SignalpropCallback` probes a ``LightningModule`` during
``Trainer.fit``, logs per-layer statistics through the trainer's loggers, warns once per diagnosis
finding, and writes the record (plus findings and, when available, the doctor's HTML report).

Needs the ``[lightning]`` extra (``pip install pytorch-lightning``); the unified ``lightning``
package (``lightning.pytorch``) is used when ``pytorch_lightning`` is not installed.

Step boundaries. Lightning calls ``optimizer.step(closure)`` with the forward and backward pass
*inside* the closure, so a torch optimiser pre-step hook would fire before the gradients exist.
The callback therefore finalises a probe step from Lightning's own hooks:

1. ``on_before_backward`` (each micro-batch): the loss, already divided by
   ``accumulate_grad_batches`` by Lightning, is summed, so the recorded ``loss`` is the mean over
   the accumulation window (AMP's loss scale is divided out).
2. ``on_before_optimizer_step``: gradients are fully accumulated (and unscaled under AMP) but not
   yet clipped. All per-layer statistics are computed here, including ``grad_norm`` and the global
   ``grad_norm_total`` *before* clipping; forward statistics see every micro-batch of the window
   (concatenated, before the probe's row subsample).
3. Lightning clips (``gradient_clip_val``), the optimiser updates the weights.
4. ``on_train_batch_end``: the gradients now hold the clipped values, so the global norm *after*
   clipping is recorded as ``grad_norm_total_clipped``; update ratios ``||dW|| / ||W||`` are
   computed, and the step is committed, logged and (every ``diagnose_every`` steps) diagnosed.

Record step ``k`` is the ``k``-th optimiser step (``trainer.global_step`` when its gradients were
measured), whatever ``accumulate_grad_batches`` is; loggers receive that same step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from signalprop import __version__, stats
from signalprop.integrations.common import (
    FindingWarner,
    report_from_record,
    set_callback_core,
    summary_metrics,
)
from signalprop.integrations.common import SignalpropWarning as SignalpropWarning  # public here
from signalprop.integrations.common import finding_key as finding_key  # public here
from signalprop.integrations.distributed import install_reducer
from signalprop.integrations.tensorboard import TensorBoardWriter, scalar_tag
from signalprop.probe import Probe
from signalprop.probe.schedule import Schedule
from signalprop.record import MODEL, atomic_write_text

# Subclass the Callback of BOTH packages when both are installed: Lightning's trainers check
# ``isinstance(cb, Callback)`` against their own package, so one class then serves
# ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer`` alike (no mixed-import error).
_BASES: list[type] = []
try:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback as _PTLCallback

    _BASES.append(_PTLCallback)
except ImportError:  # pragma: no cover - depends on the environment
    pass
try:
    import lightning.pytorch as _lpl
    from lightning.pytorch.callbacks import Callback as _LCallback

    _BASES.append(_LCallback)
    if len(_BASES) == 1:  # pragma: no cover - only the unified package is installed
        pl = _lpl  # type: ignore[no-redef]
except ImportError:  # pragma: no cover - depends on the environment
    pass
if not _BASES:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Lightning integration needs PyTorch Lightning: pip install 'signalprop[lightning]' "
        "(pytorch-lightning or the unified lightning package)"
    )
Callback = _BASES[0]

#: Metrics sent to the trainer's loggers by default: the ones a reader scans for vanishing,
#: exploding, saturated or dead layers and NaNs. Whole-model scalars (``loss``,
#: ``grad_norm_total``, ``grad_norm_total_clipped``) are always logged. Pass
#: ``log_metrics="all"`` for everything the probe records (percentiles, means, weight norms).
DEFAULT_LOG_METRICS: tuple[str, ...] = (
    "grad_norm",
    "out_grad_norm",
    "out_std",
    "saturated_frac",
    "dead_frac",
    "update_ratio",
    "grad_nonfinite",
    "out_nonfinite",
    "out_grad_nonfinite",
)

#: MODEL metric: the global gradient norm after Lightning's gradient clipping (equal to
#: ``grad_norm_total`` when nothing was clipped).
CLIPPED_NORM = "grad_norm_total_clipped"


class _FromWarner:
    """An attribute of the callback kept on its :class:`FindingWarner` (same name there)."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else getattr(obj.warner, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.warner, self.name, value)


class SignalpropCallback(*_BASES):  # type: ignore[misc]
    """Probe a LightningModule during ``Trainer.fit``.

    Example::

        from signalprop.integrations.lightning import SignalpropCallback
        trainer = pl.Trainer(max_epochs=5, callbacks=[SignalpropCallback(every=10)])
        trainer.fit(model, loader)
        cb.record          # signalprop.Record, also saved to <log_dir>/signalprop/record.json.gz
        cb.findings        # diagnosis findings at the end of training

    Args:
        every: Record every ``every`` optimiser steps (ignored when ``schedule`` is given).
        diagnose_every: Diagnose the record so far every this many optimiser steps (and always
            at the end of ``fit``); ``None`` or 0: only at the end. New findings become
            :class:`SignalpropWarning` warnings, once per finding kind and layer range.
        out_dir: Where to write ``record.json.gz``, ``findings.json`` and ``report.html`` at the
            end of ``fit``. ``None``: ``<trainer.log_dir>/signalprop`` (or the trainer's
            ``default_root_dir`` without a logger).
        save: Write the files above (set ``False`` to keep everything in memory).
        schedule: A probe schedule (``signalprop.log_spaced(...)``, a list of steps ...)
            overriding ``every``.
        log_metrics: Metric names sent to every ``trainer.loggers`` entry with
            ``log_metrics`` as ``signalprop/<metric>/<layer>``; ``"all"`` for every metric,
            ``None`` or ``()`` to log nothing. Never shown in the progress bar.
        histograms: With a ``TensorBoardLogger``, also write depth histograms of the gradient
            norms and per-layer percentile histograms into its event file.
        warn: Emit findings as warnings.
        thresholds: Passed to :func:`signalprop.diagnosis.diagnose`.
        probe_kwargs: Extra :class:`~signalprop.probe.Probe` arguments (``modules=``,
            ``percentiles=``, ``forward=False`` ...).
        on_record: Extra listeners ``f(step, values)`` called after each recorded step, with
            the clipped norm and the loss included.
        report: Write the doctor's HTML report.
        callback_metrics: Put the step's summary scalars
            (:func:`signalprop.integrations.common.summary_metrics`, e.g.
            ``signalprop/grad_ratio_first_last``) into ``trainer.callback_metrics``, where
            ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them.
    """

    def __init__(
        self,
        every: int = 10,
        diagnose_every: int | None = 100,
        out_dir: str | os.PathLike[str] | None = None,
        *,
        save: bool = True,
        schedule: Schedule | Iterable[int] | None = None,
        log_metrics: Iterable[str] | str | None = DEFAULT_LOG_METRICS,
        histograms: bool = True,
        warn: bool = True,
        thresholds: Any = None,
        probe_kwargs: Mapping[str, Any] | None = None,
        on_record: Iterable[Callable[[int, dict[str, dict[str, float]]], None]] = (),
        report: bool = True,
        callback_metrics: bool = True,
    ) -> None:
        super().__init__()
        set_callback_core(self, every, diagnose_every, out_dir, save, schedule, probe_kwargs,
                          on_record, report)
        if isinstance(log_metrics, str):
            if log_metrics != "all":
                raise ValueError(
                    f"log_metrics must be 'all', None or a list of metric names, got {log_metrics!r}"
                )
            self.log_metrics: frozenset[str] | None = None  # None = all
        else:
            self.log_metrics = frozenset(log_metrics or ())
        self._log_nothing = log_metrics is None or (
            not isinstance(log_metrics, str) and not self.log_metrics
        )
        self.every = every
        self.histograms = histograms
        self.warner = FindingWarner(thresholds, warn)
        self.callback_metrics = callback_metrics

        self.probe: Probe | None  # set by set_callback_core, as are record and schedule
        self._stepped = False
        self._loss_sum: torch.Tensor | None
        self._tb_writers: list[Any] = []
        self._rank_zero = True

    # ---- set-up / tear-down --------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is None:
            self.probe = Probe(
                pl_module, schedule=self.schedule, record=self.record, **self.probe_kwargs
            )
        install_reducer(self.probe, pl_module)  # DDP/FSDP: values combined across ranks
        # a resumed run continues its step count: record step == optimiser steps so far
        self.probe.step_index = int(trainer.global_step)
        self.probe.attach()
        self._rank_zero = bool(trainer.is_global_zero)
        self.warner.model = pl_module
        meta = self.record.meta
        if trainer.optimizers:
            meta.setdefault("optimizer", type(trainer.optimizers[0]).__name__.lower())
            lr = trainer.optimizers[0].param_groups[0].get("lr")
            if isinstance(lr, int | float):
                meta.setdefault("lr", float(lr))
        meta["accumulate_grad_batches"] = int(trainer.accumulate_grad_batches)
        meta["gradient_clip_val"] = trainer.gradient_clip_val
        meta["gradient_clip_algorithm"] = str(trainer.gradient_clip_algorithm or "norm")
        meta["source"] = "lightning"
        meta.setdefault("name", type(pl_module).__name__)
        meta.setdefault("data", "Lightning dataloader")
        self._tb_writers = self._make_tb_writers(trainer) if self.histograms else []
        self._stepped = False
        self._loss_sum = None

    def _make_tb_writers(self, trainer: pl.Trainer) -> list[Any]:
        out = []
        for logger in trainer.loggers:
            if type(logger).__name__ != "TensorBoardLogger" or not trainer.is_global_zero:
                continue
            # scalars go through log_metrics like every other logger; only histograms here
            out.append(
                TensorBoardWriter(writer=logger.experiment, scalars=False, histograms=True)
            )
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # keep what was measured up to the failure (a divergence is worth a record)
        self._finish(trainer)

    def _finish(self, trainer: pl.Trainer) -> None:
        if self.probe is None:
            return
        if self._stepped:  # a step whose batch-end hook never came
            self._end_step(trainer)
        self.probe.detach()
        for w in self._tb_writers:
            w.flush()
        self._tb_writers = []
        self.record.meta["steps_run"] = int(trainer.global_step)
        if self.record.steps and self.warner.last_step != self.record.steps[-1]:
            self._run_diagnosis(None)
        if self.save and trainer.is_global_zero and self.record.steps:
            self._write(trainer)

    # ---- the step ------------------------------------------------------------------------------
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.probe is None or not self.probe.recording:
            return
        v = loss.detach().float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and hasattr(scaler, "get_scale"):
            v = v / scaler.get_scale()  # AMP hands the hooks the scaled loss
        self._loss_sum = v if self._loss_sum is None else self._loss_sum + v

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        p = self.probe
        if p is None:
            return
        if self._stepped:
            # manual optimisation with several optimiser steps in one batch: close the last one
            self._end_step(trainer)
        self._stepped = True
        if not p.recording:
            return
        if self._loss_sum is not None:
            p.log(loss=self._loss_sum)
        p.gradients_ready()  # every statistic except update ratios
        if p.weights:
            # a copy of the weights for ||W_after - W_before|| (the probe takes this itself when
            # it owns the optimiser's hooks; here Lightning owns the step)
            p.snapshot_weights()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._stepped:
            self._end_step(trainer)

    def _end_step(self, trainer: pl.Trainer) -> None:
        p = self.probe
        assert p is not None
        self._stepped = False
        self._loss_sum = None
        step = p.step_index
        pending = p.pending()
        if p.recording and pending is not None and p.weights:
            # after clipping and the update, before the next zero_grad: the clipped gradients
            grads = [q.grad for _, q in p.params if q.grad is not None]
            if grads:
                pending.setdefault(MODEL, {})[CLIPPED_NORM] = float(stats.global_norm(grads))
        committed = pending is not None
        p.stepped()  # update ratios, commit to the record, advance the step counter
        if not committed or step not in self.record.data:
            return
        values = self.record.data[step]
        if self.callback_metrics:
            # summary scalars where EarlyStopping/ModelCheckpoint look (every rank: a
            # monitor must exist on each process)
            trainer.callback_metrics.update(
                {k: torch.tensor(v) for k, v in summary_metrics(values).items()}
            )
        if trainer.is_global_zero:
            self._log(trainer, step, values)
            for w in self._tb_writers:
                w.write_step(step, values)
        for f in self.listeners:
            f(step, values)
        if self.diagnose_every is not None and step >= self._next_diagnosis:
            self._next_diagnosis = step + self.diagnose_every
            self._run_diagnosis(step)

    # ---- outputs -------------------------------------------------------------------------------
    def _log(self, trainer: pl.Trainer, step: int, values: Mapping[str, Mapping[str, float]]) -> None:
        if self._log_nothing or not trainer.loggers:
            return
        keep = self.log_metrics
        metrics = {
            scalar_tag(m, layer): float(v)
            for layer, d in values.items()
            for m, v in d.items()
            if layer == MODEL or keep is None or m in keep
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _run_diagnosis(self, step: int | None) -> None:
        # one warning per run, not one per process
        self.warner(self.record, step, emit=self._rank_zero)

    # the warner's state under the names this callback always had
    findings = _FromWarner("Findings of the latest diagnosis.")
    explanation = _FromWarner("The mean-field explanation of the latest diagnosis.")
    warned = _FromWarner("Findings already warned about (kind and layer range).")
    warn = _FromWarner("Emit findings as warnings.")
    thresholds = _FromWarner("Diagnosis thresholds.")

    def _resolve_out_dir(self, trainer: pl.Trainer) -> Path:
        if self.out_dir is not None:
            return self.out_dir
        base = trainer.log_dir if trainer.loggers else None
        return Path(base or trainer.default_root_dir) / "signalprop"

    def _write(self, trainer: pl.Trainer) -> None:
        out = self._resolve_out_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        self.written["record"] = self.record.save(out / "record.json.gz")
        path = out / "findings.json"
        atomic_write_text(
            path,
            json.dumps([f.to_dict() for f in self.findings], indent=2, allow_nan=False),
        )
        self.written["findings"] = path
        if self.report:
            meta = {
                "name": type(trainer.lightning_module).__name__,
                "model": self.record.meta.get("model", ""),
                "data": "Lightning dataloader",
                "steps_run": int(trainer.global_step),
                "optimizer": self.record.meta.get("optimizer", ""),
                "lr": self.record.meta.get("lr", ""),
                "recorded_steps": len(self.record),
                "num_parameters": self.record.meta.get("num_parameters"),
                "signalprop": __version__,
                "torch": torch.__version__,
            }
            path = out / "report.html"
            report_from_record(self.record, self.findings, meta,
                               explanation=self.explanation).to_html(path)
            self.written["report"] = path

    def state_dict(self) -> dict[str, Any]:
        # keeps "warn once" across checkpoint/resume
        return {"warned": sorted(list(k) for k in self.warned)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warned = {tuple(k) for k in state_dict.get("warned", [])}  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"SignalpropCallback(schedule={self.schedule}, diagnose_every={self.diagnose_every}, "
            f"steps_recorded={len(self.record)})"
        )
