"""``signalprop.doctor``: train a copy of a model briefly under a probe, diagnose the record, and
(optionally) try the prescribed remedies side by side.

    >>> import signalprop
    >>> report = signalprop.doctor(model, (x, y), torch.nn.CrossEntropyLoss(), steps=200)  # doctest: +SKIP
    >>> report.findings, report.prescriptions                                            # doctest: +SKIP
    >>> report.to_html("report.html"); print(report.to_json())                          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from signalprop import __version__
from signalprop._callable import make_module_callable
from signalprop._device import resolve_device
from signalprop._progress import ProgressBar
from signalprop._registry import check_choice
from signalprop.data import Dataset
from signalprop.diagnosis import REMEDY_NAMES, Thresholds, diagnose, merge_prescriptions
from signalprop.diagnosis.architecture import architecture_facts
from signalprop.diagnosis.explain import attach as attach_explanation
from signalprop.diagnosis.explain import critical_remedy, explain_or_skip

# Report, its JSON encoder and schema live in signalprop.diagnosis.report (so that the HTML page
# can name the type without importing the doctor); re-exported here: signalprop.doctor.Report
# and friends are public names.
from signalprop.diagnosis.report import REPORT_SCHEMA as REPORT_SCHEMA
from signalprop.diagnosis.report import Report as Report
from signalprop.diagnosis.report import _jsonable as _jsonable
from signalprop.probe import every
from signalprop.train import FitResult, check_finite_data, example_inputs, fit
from signalprop.trial import trial as run_trial
from signalprop.validation import check_batch_size, check_inputs, check_positive_int

#: Probe at most about this many steps (evenly spaced) so that records stay a few MB.
MAX_RECORDED_STEPS = 300

LossFn = Callable[[Any, Any], torch.Tensor]
StepFn = Callable[[nn.Module, Any], torch.Tensor]


# --- input checks --------------------------------------------------------------------------------
def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(
            f"model {type(model).__name__} has no trainable parameters: there is nothing to "
            "train or diagnose"
        )
    try:
        return copy.deepcopy(model)
    except Exception as e:  # deepcopy can fail on exotic members (locks, open files)
        raise TypeError(
            f"cannot copy model {type(model).__name__} ({e}); the doctor trains a copy so that "
            "your model is left untouched"
        ) from e


_check_device = resolve_device  # the one "auto" resolver (signalprop._device)


def _count_nonfinite(data: Any) -> int | None:
    """NaN/Inf entries in the inputs/targets when the data are tensors in memory (cheap);
    ``None`` for loaders, which would cost a pass over the data."""
    tensors: list[torch.Tensor] = []
    if isinstance(data, Dataset):
        tensors = [data.x_train, data.y_train]
    elif isinstance(data, (tuple, list)) and len(data) >= 2 and all(
        isinstance(t, torch.Tensor) for t in data
    ):
        tensors = list(data)
    elif isinstance(data, Mapping) and data and all(
        isinstance(t, torch.Tensor) for t in data.values()
    ):
        tensors = list(data.values())
    else:
        ds = getattr(data, "dataset", None)
        if isinstance(ds, torch.utils.data.TensorDataset):
            tensors = list(ds.tensors)
        else:
            return None
    return int(sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point()))


def _describe_data(data: Any) -> str:
    if isinstance(data, Dataset):
        return f"{data.name} ({data.x_train.shape[0]} x {data.in_features})"
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return f"tensors x{tuple(data[0].shape)} y{tuple(data[1].shape)}"
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return "tensors " + " ".join(str(tuple(t.shape)) for t in data)
    if isinstance(data, Mapping) and data and all(isinstance(t, torch.Tensor) for t in data.values()):
        return "tensors " + ", ".join(f"{k}{tuple(t.shape)}" for k, t in data.items())
    return type(data).__name__


def _schedule(steps: int) -> Any:
    return every(max(1, math.ceil(steps / MAX_RECORDED_STEPS)))


def _Progress(total: int, label: str) -> ProgressBar:  # noqa: N802 - was a class here
    """The doctor's bar: one task, the loss beside it, removed when done."""
    return ProgressBar({label: total}, loss=True, transient=True)


def _mean_curve(curves: list[list[float]]) -> list[float]:
    """Element-wise mean of loss curves over seeds (up to the shortest: a diverged run stops)."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def _run_trials(
    model: nn.Module,
    data: Any,
    loss_fn: LossFn | None,
    remedies: Sequence[Any],
    settings: dict[str, Any],
    seeds: int,
    progress: bool,
) -> tuple[list[dict[str, Any]], Any]:
    """Run :func:`signalprop.trial.trial` on the chosen remedies.

    Returns:
        ``(rows, table)``: one JSON-ready dict per remedy (baseline first) with the mean loss
        curve under ``"losses"``, and the ``TrialTable`` itself.
    """
    kw = dict(settings)
    kw["seed"] = kw.get("seed") or 0
    total = (len(remedies) + 1) * seeds
    if progress:
        with _Progress(total, "trials") as bar:
            done = [0]

            def cb(remedy: str, seed: int, run: Any) -> None:
                bar(done[0], float(getattr(run, "final_loss", math.nan)))
                done[0] += 1

            table = run_trial(model, data, loss_fn, remedies=list(remedies), seeds=seeds,
                              progress=cb, **kw)
    else:
        table = run_trial(model, data, loss_fn, remedies=list(remedies), seeds=seeds, **kw)
    rows = []
    for row in table:
        d = row.to_dict()
        d["losses"] = _mean_curve([list(r.losses) for r in getattr(row, "runs", [])])
        rows.append(d)
    return rows, table


# long: 19 documented arguments take 68 of its lines; the steps are named below it
def doctor(
    model: nn.Module,
    data: Any,
    loss_fn: LossFn | None = None,
    steps: int = 200,
    optimizer: str | Any = "sgd",
    lr: float = 0.1,
    device: str | torch.device = "cpu",
    validate: bool = False,
    trial: bool = False,
    remedies: Sequence[str] | None = None,
    progress: bool = True,
    *,
    seed: int | None = 0,
    batch_size: int = 64,
    thresholds: Thresholds | Mapping[str, Any] | None = None,
    max_trials: int = 5,
    trial_seeds: int = 2,
    name: str | None = None,
    step_fn: StepFn | None = None,
) -> Report:
    """Train a copy of ``model`` briefly under a probe and diagnose its signal propagation.

    Args:
        model: Any ``nn.Module`` with trainable parameters (deep-copied; yours is not touched).
        data: A DataLoader (or any iterable of batches: ``(x, ..., y)`` tuples or dicts such as
            Hugging Face batches), tensors in memory (``(x, ..., y)`` or a dict of tensors), or a
            :class:`signalprop.data.Dataset`. See :func:`signalprop.train.fit` for how each
            batch form reaches the model.
        loss_fn: ``loss_fn(prediction, y)`` (tuple batches) or ``loss_fn(prediction, batch)``
            (dict batches) returning a scalar tensor; the prediction is the output, its
            ``.logits``, or a tuple's first element. ``None``: the model returns its loss
            (``output.loss``, e.g. a Hugging Face model given ``labels``).
        steps: Optimiser steps to train (the data are cycled).
        optimizer: A registered optimiser name (``"sgd"``, ``"adam"``, ...) or a factory
            ``f(params, lr=...)``.
        lr: Learning rate.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        validate: Refuse data containing NaN/Inf up front (``ValueError``). Without it, NaN that
            appears during training becomes a ``nonfinite`` finding.
        trial: Also train the top prescribed remedies side by side (``signalprop.trial``).
        remedies: Remedies to trial instead of the top ``max_trials`` prescriptions.
        progress: Show a progress bar on stderr.
        seed: Seed for the copy's training (data order); ``None`` leaves the RNG alone.
        batch_size: Mini-batch size for tensor pairs and ``Dataset``.
        thresholds: Diagnosis thresholds (see :class:`signalprop.diagnosis.Thresholds`).
        max_trials: How many prescriptions to trial when ``remedies`` is not given.
        trial_seeds: Runs per remedy in the trials (paired by seed with the baseline).
        name: A label for the report (e.g. the example's name).
        step_fn: ``step_fn(model, batch) -> loss`` for any other model or batch (replaces the
            forward pass and ``loss_fn``).

    Returns:
        A :class:`Report`.

    Raises:
        TypeError: model not an ``nn.Module``, loss not callable, data of an unsupported kind.
        ValueError: model without parameters, non-scalar loss, NaN/Inf data with
            ``validate=True``, bad ``steps``/``lr``/device, unknown optimiser or remedy names.
    """
    work, dev, th, remedies = _check_args(model, loss_fn, step_fn, steps, lr, batch_size, trial,
                                          trial_seeds, max_trials, device, thresholds, remedies)
    if validate:
        check_finite_data(data)
    data_bad = _count_nonfinite(data)
    # the data against the model and the loss, before any training (signalprop.validation)
    check_inputs(work, data, loss_fn, step_fn=step_fn, batch_size=batch_size, seed=seed or 0)

    t0 = time.perf_counter()
    settings: dict[str, Any] = dict(steps=steps, optimizer=optimizer, lr=lr,
                                    batch_size=batch_size, device=dev, seed=seed)
    if step_fn is not None:
        settings["step_fn"] = step_fn
    result = _diagnosis_run(work, data, loss_fn, settings, progress,
                            f"doctor: {name or type(model).__name__}")
    report = _diagnose_run(result, model, work, data, loss_fn, settings, data_bad, th, name)
    meta = report.meta
    if "data_ended" in result.extra:
        why = (f"the data ran out after {result.steps} of {steps} steps (a one-shot iterator "
               "cannot be cycled; pass a list, a DataLoader or tensors to train longer); the "
               f"report covers the {result.steps} steps trained")
        meta.setdefault("warnings", []).append(why)
        warnings.warn(why, stacklevel=2)
    stopped = result.extra.get("stopped")  # an error in the user's code after some steps
    if stopped is not None:
        # an error in the user's code mid-run: the steps trained are diagnosed and handed back
        # with the error (``error.report``), so that nothing trained is lost
        meta["stopped"] = {"reason": "error", "step": result.steps, "message": str(stopped)}
        meta["total_seconds"] = time.perf_counter() - t0
        stopped.report = report
        raise stopped
    if trial and result.interrupted:
        meta["trials_skipped"] = "interrupted (Ctrl-C) during the diagnosis run"
    elif trial:
        _trial_prescriptions(report, model, data, loss_fn, remedies, max_trials, settings,
                             trial_seeds, progress)
    meta["total_seconds"] = time.perf_counter() - t0
    return report


def _check_args(
    model: Any, loss_fn: Any, step_fn: Any, steps: Any, lr: Any, batch_size: Any, trial: bool,
    trial_seeds: Any, max_trials: Any, device: Any, thresholds: Any, remedies: Any,
) -> tuple[nn.Module, torch.device, Thresholds, list[str] | None]:
    """Refuse bad arguments before anything runs: ``(copy of the model, device, thresholds,
    remedies by their canonical names)``."""
    work = _check_model(model)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if step_fn is not None and not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    check_batch_size(batch_size)
    if trial:
        check_positive_int("trial_seeds", trial_seeds)
        check_positive_int("max_trials", max_trials)
    dev = _check_device(device)
    th = Thresholds.coerce(thresholds)
    if remedies is not None:
        remedies = [check_choice("remedy", r, REMEDY_NAMES) for r in remedies]
    return work, dev, th, remedies


def _diagnosis_run(work: nn.Module, data: Any, loss_fn: LossFn | None, settings: dict[str, Any],
                   progress: bool, label: str) -> FitResult:
    """Train the copy under the probe. The diagnosis run goes on past fit's loss bound, up to
    non-finite values, so that the record shows where they first appear (the trials keep the
    bound)."""
    run_kw: dict[str, Any] = dict(probe={"schedule": _schedule(settings["steps"])},
                                  diverge_factor=None, keep_partial=True)
    if progress:
        with _Progress(settings["steps"], label) as bar:
            return fit(work, data, loss_fn, progress=bar, **run_kw, **settings)
    return fit(work, data, loss_fn, **run_kw, **settings)


def _diagnose_run(result: FitResult, model: nn.Module, work: nn.Module, data: Any,
                  loss_fn: LossFn | None, settings: dict[str, Any], data_bad: int | None,
                  th: Thresholds, name: str | None) -> Report:
    """The run's record completed with what the diagnosis reads, its findings, explanation and
    prescriptions, as a :class:`Report`."""
    record = result.record
    optimizer, lr = settings["optimizer"], settings["lr"]
    step_fn, batch_size = settings.get("step_fn"), settings["batch_size"]
    opt_name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom")
    record.meta.update({
        "optimizer": opt_name,
        "lr": lr,
        "data_nonfinite": data_bad or 0,
        "diverged": result.diverged,
        "diverged_step": result.diverged_step,
    })
    for k, v in architecture_facts(work).items():
        record.meta.setdefault(k, v)
    record.meta.setdefault("example_input", step_fn is None
                           and example_inputs(data, batch_size) is not None)
    findings = diagnose(record, th)
    explanation = explain_or_skip(record, work, batch_size=batch_size)
    attach_explanation(findings, explanation)
    meta = _report_meta(result, model, work, data, loss_fn, settings, data_bad, th, name,
                        opt_name)
    return Report(findings, merge_prescriptions(findings), record, [], meta,
                  list(result.losses), explanation=explanation)


def _report_meta(result: FitResult, model: nn.Module, work: nn.Module, data: Any,
                 loss_fn: LossFn | None, settings: dict[str, Any], data_bad: int | None,
                 th: Thresholds, name: str | None, opt_name: str) -> dict[str, Any]:
    """The report's ``meta``: what ran, on what, and how it ended."""
    step_fn = settings.get("step_fn")
    record = result.record
    return {
        "name": name or type(model).__name__,
        "model": type(model).__name__,
        "num_parameters": sum(p.numel() for p in work.parameters()),
        "data": _describe_data(data),
        "data_nonfinite": data_bad,
        "loss_fn": ("step_fn: " + getattr(step_fn, "__name__", type(step_fn).__name__))
        if step_fn is not None else "the model's own loss" if loss_fn is None
        else getattr(loss_fn, "__name__", type(loss_fn).__name__),
        "steps": settings["steps"],
        "steps_run": result.steps,
        "optimizer": opt_name,
        "lr": settings["lr"],
        "batch_size": settings["batch_size"],
        "device": str(settings["device"]),
        "seed": settings["seed"],
        "recorded_steps": len(record.steps),
        "diverged": result.diverged,
        "diverged_step": result.diverged_step,
        "diverged_reason": result.diverged_reason,
        "interrupted": result.interrupted,
        "trivial_loss": result.trivial_loss,
        "trivial_kind": result.trivial_kind,
        "train_seconds": result.wall_time,
        # layers the probe could not check, and why (also in the record and the HTML report)
        "unchecked": dict(record.meta.get("unchecked") or {}),
        "thresholds": th.to_dict(),
        "signalprop": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _trial_prescriptions(report: Report, model: nn.Module, data: Any, loss_fn: LossFn | None,
                         remedies: list[str] | None, max_trials: int, settings: dict[str, Any],
                         trial_seeds: int, progress: bool) -> None:
    """Train the chosen remedies (or the top prescriptions) side by side; into the report."""
    chosen = list(remedies) if remedies is not None else [
        p.remedy for p in report.prescriptions[:max_trials]
    ]
    if not chosen:
        report.meta["trials_skipped"] = "no prescriptions to try"
        return
    # critical_init is tried with the sigma_w computed for this model
    chosen = [critical_remedy(report.explanation) if r == "critical_init" else r
              for r in chosen]
    report.trials, report.trial_table = _run_trials(model, data, loss_fn, chosen, settings,
                                                    trial_seeds, progress)


# ``signalprop.doctor`` is both this module and the doctor() function (see signalprop._callable)
make_module_callable(__name__, "doctor")
