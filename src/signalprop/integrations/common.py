"""What every integration shares: summary scalars of one recorded step, the depth profile,
warning once per diagnosis finding, and writing a record with its findings and HTML report.

The Lightning and Hugging Face callbacks, the W&B/MLflow writers, Ray Tune reporting and the
``signalprop diagnose|report RECORD`` commands all go through these functions, so a record saved
by any of them gives the same findings and the same page as ``signalprop doctor``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from signalprop import __version__
from signalprop.diagnosis import diagnose, merge_prescriptions
from signalprop.diagnosis.explain import attach, explain
from signalprop.diagnosis.report import Report
from signalprop.probe.schedule import Schedule, as_schedule
from signalprop.record import MODEL, Record, atomic_write_text

#: Step values as the probe hands them to ``on_record`` listeners: ``values[layer][metric]``.
StepValues = Mapping[str, Mapping[str, float]]

#: Whole-model scalars copied into the summary as they are (when recorded).
MODEL_SCALARS: tuple[str, ...] = (
    "loss",
    "grad_norm_total",
    "grad_norm_total_clipped",
    "trainer_grad_norm",
)

#: Keys of :func:`summary_metrics` besides :data:`MODEL_SCALARS`, with their meaning.
SUMMARY_KEYS: dict[str, str] = {
    "grad_norm_first": "||dL/dW|| of the first weight (non-bias parameter) in model order",
    "grad_norm_last": "||dL/dW|| of the last weight (usually the output layer)",
    "grad_ratio_first_last": "grad_norm_first / grad_norm_last: << 1 vanishing, >> 1 exploding",
    "grad_norm_min": "smallest per-parameter gradient norm",
    "grad_norm_max": "largest per-parameter gradient norm",
    "grad_decades": "log10(grad_norm_max / grad_norm_min): spread of gradient scales over depth",
    "update_ratio_max": "largest ||dW|| / ||W|| of the step",
    "saturated_frac_max": "largest saturated fraction over activation layers",
    "dead_frac_max": "largest dead (never active) fraction over rectifier layers",
    "nonfinite": "NaN/Inf entries counted over outputs, output gradients and gradients",
}


def _weights(values: StepValues, metric: str) -> list[tuple[str, float]]:
    """``(parameter, value)`` of ``metric`` over non-bias parameters in insertion order (the
    probe inserts parameters in ``named_parameters`` order, i.e. model order)."""
    out = [(n, float(d[metric])) for n, d in values.items() if n != MODEL and metric in d]
    no_bias = [(n, v) for n, v in out if not n.endswith("bias")]
    return no_bias or out


def summary_metrics(values: StepValues, prefix: str = "signalprop/") -> dict[str, float]:
    """A dozen scalars that summarise one recorded step (see :data:`SUMMARY_KEYS`).

    Non-finite values are kept (a NaN gradient norm is news, not noise); keys whose inputs were
    not recorded are left out.

    Args:
        values: One step's ``values[layer][metric]`` (a probe ``on_record`` argument or
            ``record.data[step]``).
        prefix: Prepended to every key.

    Returns:
        ``{prefix + key: value}``.
    """
    out: dict[str, float] = {}
    model = values.get(MODEL, {})
    for k in MODEL_SCALARS:
        if k in model:
            out[k] = float(model[k])
    grads = _weights(values, "grad_norm")
    if grads:
        first, last = grads[0][1], grads[-1][1]
        out["grad_norm_first"] = first
        out["grad_norm_last"] = last
        out["grad_ratio_first_last"] = first / last if last != 0 else math.inf
        finite = [v for _, v in grads if math.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            out["grad_norm_min"], out["grad_norm_max"] = lo, hi
            positive = [v for v in finite if v > 0]
            if positive:
                out["grad_decades"] = math.log10(max(positive) / min(positive))
    for metric, key in (("update_ratio", "update_ratio_max"),
                        ("saturated_frac", "saturated_frac_max"),
                        ("dead_frac", "dead_frac_max")):
        vs = [float(d[metric]) for n, d in values.items() if n != MODEL and metric in d]
        if vs:
            out[key] = max(vs)
    bad = [float(v) for d in values.values() for m, v in d.items() if m.endswith("nonfinite")]
    if bad:
        out["nonfinite"] = sum(bad)
    return {prefix + k: v for k, v in out.items()}


def depth_profile(values: StepValues, metric: str = "grad_norm") -> tuple[list[str], list[float]]:
    """``(layers, values)`` of one metric over depth at one step, in model order.

    For ``grad_norm``/``update_ratio``/``weight_norm`` the layers are the weights (biases
    left out, as in :func:`summary_metrics`); for module metrics (``out_grad_norm``,
    ``out_std`` ...) every module that has the metric.
    """
    pairs = _weights(values, metric)
    return [n for n, _ in pairs], [v for _, v in pairs]


class SignalpropWarning(UserWarning):
    """A diagnosis finding raised during training (filter with
    ``warnings.filterwarnings("ignore", category=SignalpropWarning)``)."""



def check_callback_args(
    every: Any, diagnose_every: Any, probe_kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Validate the arguments every signalprop training callback shares (one message each).

    Returns:
        A copy of ``probe_kwargs`` (``{}`` for None).

    Raises:
        ValueError: ``every`` is not an int >= 1, ``diagnose_every`` not None or an int >= 0, or
            ``probe_kwargs`` sets something the callback manages itself.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")
    if diagnose_every is not None and (
        isinstance(diagnose_every, bool) or not isinstance(diagnose_every, int)
        or diagnose_every < 0
    ):
        raise ValueError(f"diagnose_every must be None or an int >= 0, got {diagnose_every!r}")
    kw = dict(probe_kwargs or {})
    for bad in ("optimizer", "schedule", "on_record", "record"):
        if bad in kw:
            raise ValueError(
                f"probe_kwargs may not set {bad!r}: the callback manages it "
                "(use the callback's own argument where there is one)"
            )
    return kw

def set_callback_core(
    cb: Any, every: Any, diagnose_every: Any, out_dir: str | os.PathLike[str] | None, save: bool,
    schedule: Schedule | Iterable[int] | None, probe_kwargs: Mapping[str, Any] | None,
    on_record: Iterable[Callable[..., Any]], report: bool,
) -> None:
    """The settings and the starting state every signalprop training callback shares, checked
    (:func:`check_callback_args`) and set on ``cb``."""
    kw = check_callback_args(every, diagnose_every, probe_kwargs)
    cb.schedule = as_schedule(schedule if schedule is not None else every)
    cb.diagnose_every = diagnose_every or None
    cb.out_dir = Path(out_dir) if out_dir is not None else None
    cb.save = save
    cb.report = report
    cb.probe_kwargs = kw
    cb.listeners = list(on_record)
    cb.probe = None
    cb.record = Record()
    cb.written = {}
    cb._loss_sum = None
    cb._next_diagnosis = 0


def finding_key(finding: Any) -> tuple[str, str, str]:
    """``(kind, first layer, last layer)``: a finding is warned about once per key."""
    layers = list(getattr(finding, "layers", []) or [])
    first = layers[0] if layers else ""
    last = layers[-1] if layers else ""
    return (str(finding.kind), first, last)


def format_finding(finding: Any, step: int | None = None) -> str:
    """One warning line: kind, severity, layer range, evidence and the first prescriptions."""
    layers = list(finding.layers)
    where = ""
    if layers:
        where = f" in {layers[0]}" if len(layers) == 1 else f" in {layers[0]} .. {layers[-1]}"
        where += f" ({len(layers)} layers)" if len(layers) > 1 else ""
    at = f" at step {step}" if step is not None else ""
    rx = ", ".join(p.remedy for p in list(finding.prescriptions)[:3])
    try_ = f" Try: {rx}." if rx else ""
    return f"signalprop: {finding.kind} ({finding.severity}){where}{at}: {finding.evidence}{try_}"


def diagnose_record(
    record: Record, thresholds: Any = None, model: Any = None
) -> tuple[list[Any], Any]:
    """Findings of ``record`` as ``signalprop doctor`` gives them: the diagnosis rules, then the
    mean-field explanation attached to the gradient findings.

    Args:
        record: The record.
        thresholds: Diagnosis thresholds.
        model: The model the record is of, when at hand (resolves custom activations).

    Returns:
        ``(findings, explanation)``; the explanation is ``None`` when the record cannot
        support one.
    """
    findings = diagnose(record, thresholds)
    try:
        explanation = explain(record, model, batch_size=record.meta.get("batch_size"))
    except (ValueError, TypeError, KeyError, ZeroDivisionError):  # theory not applicable
        explanation = None
    attach(findings, explanation)
    return findings, explanation


class FindingWarner:
    """Diagnose a record and warn once per finding (kind and layer range).

    Args:
        thresholds: Passed to :func:`signalprop.diagnosis.diagnose`.
        warn: Emit warnings (``False``: only keep :attr:`findings`).
    """

    def __init__(self, thresholds: Any = None, warn: bool = True) -> None:
        self.thresholds = thresholds
        self.warn = warn
        self.model: Any = None  # set by a callback: resolves custom activations
        self.explanation: Any = None
        self.findings: list[Any] = []
        self.warned: set[tuple[str, str, str]] = set()
        self.last_step: int | None = None

    def __call__(self, record: Record, step: int | None = None, *, emit: bool = True) -> list[Any]:
        """Diagnose ``record``; warn (when ``emit``) about findings not warned about yet."""
        if not record.steps:
            return self.findings
        self.last_step = record.steps[-1]
        self.findings, self.explanation = diagnose_record(record, self.thresholds, self.model)
        for f in self.findings:
            key = finding_key(f)
            if key in self.warned:
                continue
            self.warned.add(key)
            if self.warn and emit:
                at = step if step is not None else self.last_step
                warnings.warn(format_finding(f, at), SignalpropWarning, stacklevel=3)
        return self.findings


def report_from_record(
    record: Record,
    findings: list[Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    thresholds: Any = None,
    explanation: Any = None,
) -> Any:
    """The doctor's :class:`~signalprop.doctor.Report` of a saved or live record.

    Args:
        record: A record from a probe, a callback or ``signalprop doctor``.
        findings: Findings already computed (default: diagnose the record now).
        meta: Report metadata (name, model, data, optimiser ...); the record's own ``meta``
            fills what is missing.
        thresholds: Diagnosis thresholds when ``findings`` is not given.
        explanation: The mean-field explanation that goes with ``findings``.
    """
    if findings is None:
        findings, explanation = diagnose_record(record, thresholds)
    m = record.meta
    _, losses = record.scalar("loss")
    full: dict[str, Any] = {
        "name": m.get("name", m.get("model", "model")),
        "model": m.get("model", ""),
        "data": m.get("data", m.get("source", "")),
        "steps_run": m.get("steps_run", (record.steps[-1] + 1) if record.steps else 0),
        "optimizer": m.get("optimizer", ""),
        "lr": m.get("lr", ""),
        "recorded_steps": len(record),
        "num_parameters": m.get("num_parameters"),
        "signalprop": __version__,
    }
    if "diverged" in m:
        full["diverged"] = m["diverged"]
        full["diverged_step"] = m.get("diverged_step")
    full.update(meta or {})
    return Report(
        findings=list(findings),
        prescriptions=merge_prescriptions(list(findings)),
        record=record,
        meta=full,
        losses=[float(v) for v in losses],
        explanation=explanation,
    )


def write_outputs(
    out_dir: str | os.PathLike[str],
    record: Record,
    findings: list[Any],
    meta: Mapping[str, Any] | None = None,
    *,
    report: bool = True,
    explanation: Any = None,
) -> dict[str, Path]:
    """Write ``record.json.gz``, ``findings.json`` and (with ``report``) the doctor's
    ``report.html`` into ``out_dir``. Returns ``{"record"|"findings"|"report": path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"record": record.save(out / "record.json.gz")}
    path = out / "findings.json"
    atomic_write_text(
        path, json.dumps([f.to_dict() for f in findings], indent=2, allow_nan=False)
    )
    written["findings"] = path
    if report:
        written["report"] = report_from_record(record, findings, meta,
                                               explanation=explanation).to_html(
            out / "report.html"
        )
    return written


def listeners(
    on_record: Callable[..., None] | list[Callable[..., None]] | tuple | None,
) -> list[Callable[..., None]]:
    """Normalise an ``on_record`` argument to a list."""
    if on_record is None:
        return []
    if callable(on_record):
        return [on_record]
    return list(on_record)
