"""Diagnosis rules: a :class:`~signalprop.record.Record` in, a list of findings out.

Each rule reads only record metrics (see ``signalprop.record`` for the names) and skips quietly
when the metrics it needs were not recorded, so a probe configured to record less still gets the
findings its data supports.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from signalprop.diagnosis.context import Context, context_of, fmt, pct
from signalprop.diagnosis.depth_rules import _nanmedian, _tail, rule_gradients, rule_through_time
from signalprop.diagnosis.findings import KINDS, Finding, severity_rank
from signalprop.diagnosis.prescriptions import (
    rx_dead,
    rx_divergence,
    rx_nonfinite,
    rx_not_learning,
    rx_saturation,
    rx_update_ratio,
)
from signalprop.diagnosis.thresholds import Thresholds
from signalprop.record import MODEL, Record


# --- forward: saturation and dead units -------------------------------------------------------
def _fraction_rule(
    record: Record,
    ctx: Context,
    th: Thresholds,
    metric: str,
    limit: float,
    critical: float,
) -> tuple[list[str], dict[str, Any], list[str]] | None:
    """Layers whose median ``metric`` over the tail of training is >= ``limit``."""
    layers = record.layer_names(metric=metric)
    if not layers:
        return None
    steps, _, m = record.matrix(metric, layers)
    if m.size == 0:
        return None
    ok_rows = np.isfinite(m).any(axis=1)
    steps, m = steps[ok_rows], m[ok_rows]
    if len(steps) == 0:
        return None
    tsteps, tail = _tail(steps, m, th.tail_fraction)
    med = _nanmedian(np.where(np.isfinite(tail), tail, np.nan))
    flagged_idx = [j for j in range(len(layers)) if med[j] == med[j] and med[j] >= limit]
    if not flagged_idx:
        return None
    flagged = [layers[j] for j in flagged_idx]
    mean = float(np.mean(med[flagged_idx]))
    initial = m[0, flagged_idx]
    nums = {
        "mean_fraction": mean,
        "max_fraction": float(np.max(med[flagged_idx])),
        "initial_fraction": float(np.nanmean(initial)) if np.isfinite(initial).any() else 0.0,
        "n_flagged": len(flagged),
        "n_layers": len(layers),
        "tail_steps": len(tsteps),
        "first_tail_step": int(tsteps[0]),
    }
    return flagged, nums, layers


def rule_saturation(record: Record, ctx: Context, th: Thresholds) -> list[Finding]:
    """Saturating activations with most units in their flat tails."""
    r = _fraction_rule(record, ctx, th, "saturated_frac", th.saturated_fraction,
                       th.saturation_critical_fraction)
    if r is None:
        return []
    flagged, nums, layers = r
    kinds = sorted({ctx.activations.get(n, "?") for n in flagged})
    ratio = record.meta.get("saturation_ratio", 0.1)
    text = _say_fraction(
        ctx, flagged, nums, "/".join(kinds), "saturated",
        f"|phi'(z)| < {fmt(float(ratio))} x its maximum; median over the last "
        f"{nums['tail_steps']} recorded steps, from step {nums['first_tail_step']}",
        "Saturated units pass almost no gradient.")
    sev = "critical" if nums["mean_fraction"] >= th.saturation_critical_fraction else "warning"
    return [Finding("saturation", flagged, text, sev, rx_saturation(ctx, nums, th), nums)]


def _say_fraction(ctx: Context, flagged: list[str], nums: dict[str, Any], layer_kind: str,
                  state: str, how: str, consequence: str) -> str:
    """A saturation or dead-unit finding in words, from :func:`_fraction_rule`'s numbers."""
    return (
        f"{pct(nums['mean_fraction'])} of units in {ctx.label(flagged)} ({nums['n_flagged']} "
        f"of {nums['n_layers']} {layer_kind} layers) are {state} ({how}); at the first step: "
        f"{pct(nums['initial_fraction'])}. {consequence}"
    )


def rule_dead(record: Record, ctx: Context, th: Thresholds) -> list[Finding]:
    """Rectifier units that output zero for every example of a batch."""
    r = _fraction_rule(record, ctx, th, "dead_frac", th.dead_fraction, th.dead_critical_fraction)
    if r is None:
        return []
    flagged, nums, layers = r
    text = _say_fraction(
        ctx, flagged, nums, "rectifier", "dead: zero output for every example of the batch",
        f"median over the last {nums['tail_steps']} recorded steps",
        "Dead units get no gradient and never recover.")
    sev = "critical" if nums["mean_fraction"] >= th.dead_critical_fraction else "warning"
    return [Finding("dead_units", flagged, text, sev, rx_dead(ctx, nums, th), nums)]


# --- non-finite values and divergence -----------------------------------------------------------
_COUNT_METRICS = ("out_nonfinite", "out_grad_nonfinite", "grad_nonfinite")
_VALUE_METRICS = ("out_mean", "out_std", "out_grad_norm", "grad_norm", "weight_norm")


def _bad(d: Mapping[str, float]) -> bool:
    return any(d.get(m, 0.0) > 0 for m in _COUNT_METRICS) or any(
        m in d and not math.isfinite(d[m]) for m in _VALUE_METRICS
    )


def rule_nonfinite(record: Record, ctx: Context, th: Thresholds) -> list[Finding]:
    """NaN/Inf in the loss, activations, gradients or weights; where they appeared first."""
    first = _first_nonfinite(record)
    data_bad = float(record.meta.get("data_nonfinite", 0) or 0)
    # a run stopped for a loss above the divergence bound is the divergence rule's
    diverged_step = record.meta.get("diverged_step") if record.meta.get(
        "diverged_reason") in (None, "nonfinite") else None
    if first.step is None and not data_bad and diverged_step is None:
        return []
    if first.step is None:
        first.step = int(diverged_step) if diverged_step is not None else -1
    nums = _measure_nonfinite(record, first, data_bad)
    layers = first.fwd_layers or ([] if first.in_loss else first.any_layers)
    return [Finding("nonfinite", layers, _say_nonfinite(ctx, nums, first), "critical",
                    rx_nonfinite(ctx, nums, th), nums)]


@dataclasses.dataclass
class _FirstNonfinite:
    """Where non-finite values appeared first: the step (``None``: never), how many recorded
    steps had any, the layers (forward-pass ones apart) and whether the loss made them."""

    step: int | None = None
    bad_steps: int = 0
    fwd_layers: list[str] = dataclasses.field(default_factory=list)
    any_layers: list[str] = dataclasses.field(default_factory=list)
    in_loss: bool = False


def _first_nonfinite(record: Record) -> _FirstNonfinite:
    order = {n: i for i, n in enumerate(record.layers)}
    out = _FirstNonfinite()
    for s in record.steps:
        row = record.data[s]
        loss = row.get(MODEL, {}).get("loss")
        bad_loss = loss is not None and not math.isfinite(loss)
        bad = [n for n, d in row.items() if n != MODEL and _bad(d)]
        if not (bad_loss or bad):
            continue
        out.bad_steps += 1
        if out.step is not None:
            continue
        out.step = s
        bad.sort(key=lambda n: order.get(n, len(order)))
        out.any_layers = bad
        out.fwd_layers = [
            n for n in bad
            if row[n].get("out_nonfinite", 0.0) > 0
            or not math.isfinite(row[n].get("out_mean", 0.0))
        ]
        # a non-finite loss over a finite forward pass (its outputs were measured): the loss
        # function made it (log of 0, division by zero), not the first layer whose gradient
        # it then poisoned
        seen_fwd = any("out_mean" in d for n, d in row.items() if n != MODEL)
        out.in_loss = bad_loss and seen_fwd and not out.fwd_layers
    return out


def _measure_nonfinite(record: Record, first: _FirstNonfinite, data_bad: float
                       ) -> dict[str, Any]:
    """The nonfinite finding's numbers: when and how often, whether the inputs brought the
    values in, and the gradient norm and loss before."""
    first_step = first.step
    assert first_step is not None
    mods_in_order = [n for n in record.layers if record.layers[n].role != "param"]
    at_input = bool(first.fwd_layers) and bool(mods_in_order) and \
        first.fwd_layers[0] == mods_in_order[0]
    if at_input:
        # the first module's own weights were finite: the non-finite values came in with x
        for p, info in record.layers.items():
            if info.role == "param" and info.module == mods_in_order[0]:
                w = record.get(first_step, p, "weight_norm")
                at_input &= not (w == w) or math.isfinite(w)
    nums: dict[str, Any] = {
        "first_step": first_step,
        "bad_steps": first.bad_steps,
        "recorded_steps": len(record.steps),
        "data_nonfinite": data_bad,
        "at_input": int(at_input),
    }
    steps, v = record.scalar("grad_norm_total")
    before = v[(steps < first_step) & np.isfinite(v)]
    if before.size >= 2 and before[0] > 0:
        nums["grad_growth_before"] = float(before[-1] / before[0])
    steps, lv = record.scalar("loss")
    lbefore = lv[(steps < first_step) & np.isfinite(lv)]
    if lbefore.size:
        nums["last_finite_loss"] = float(lbefore[-1])
        nums["initial_loss"] = float(lbefore[0])
    nums["in_loss"] = int(first.in_loss)
    return nums


def _say_nonfinite(ctx: Context, nums: dict[str, Any], first: _FirstNonfinite) -> str:
    """The nonfinite finding in words, from its numbers and where the values appeared."""
    parts = [f"Non-finite values (NaN/Inf) from step {nums['first_step']}"
             f" ({nums['bad_steps']} of {nums['recorded_steps']} recorded steps affected)"]
    if first.fwd_layers:
        parts.append(f"first in the forward pass of {first.fwd_layers[0]!r} "
                     f"({ctx.label(first.fwd_layers[:1])})")
    elif first.in_loss:
        parts.append("first in the loss: the model's outputs were finite and the loss function "
                     "returned NaN/Inf (look for log of 0 or of a negative number, a division "
                     "by zero or sqrt of a negative number in the loss)")
    elif first.any_layers:
        parts.append(f"first in {first.any_layers[0]!r}")
    text = "; ".join(parts) + "."
    if nums["data_nonfinite"]:
        text += (f" The input data contain {int(nums['data_nonfinite'])} NaN/Inf entries: clean "
                 "or impute them (no training remedy can).")
    elif nums["at_input"]:
        text += (" The very first layer's output is non-finite while its weights are finite: "
                 "the inputs are the likely source; check the data.")
    elif "grad_growth_before" in nums:
        text += (f" The total gradient norm grew {fmt(nums['grad_growth_before'])}x before "
                 "that, a sign of divergence.")
    if "last_finite_loss" in nums:
        text += (f" Loss went from {fmt(nums['initial_loss'])} to {fmt(nums['last_finite_loss'])}"
                 f" before becoming non-finite.")
    return text


def rule_divergence(record: Record, ctx: Context, th: Thresholds) -> list[Finding]:
    """A finite loss that ends far above where it started (or that crossed the training loop's
    divergence bound, which stopped the run)."""
    meta = record.meta
    if meta.get("diverged_reason") == "loss_bound":
        start = float(meta.get("initial_loss", math.nan))
        end = float(meta.get("diverged_loss", math.nan))
        nums = {"loss_start": start, "loss_end": end,
                "loss_ratio": end / start if start > 0 else math.nan,
                "peak_step": int(meta.get("diverged_step") or 0)}
        text = (f"The training loss diverged: it reached {fmt(end)} at step {nums['peak_step']}, "
                f"above {fmt(float(meta.get('diverge_factor') or math.nan))}x max(first loss "
                f"{fmt(start)}, 1), and training stopped there.")
        return [Finding("divergence", [], text, "critical", rx_divergence(ctx, nums, th), nums)]
    steps, v = record.scalar("loss")
    ok = np.isfinite(v)
    steps, v = steps[ok], v[ok]
    if len(v) < 4:
        return []
    start = float(np.median(v[:3]))
    end = float(np.median(v[-3:]))
    if start <= 0 or end <= th.divergence_loss_ratio * start:
        return []
    nums = {"loss_start": start, "loss_end": end, "loss_ratio": end / start,
            "peak_step": int(steps[int(np.argmax(v))])}
    text = (f"The training loss diverged: it rose from {fmt(start)} to {fmt(end)} "
            f"({fmt(end / start)}x; median of the first and last 3 recorded steps).")
    return [Finding("divergence", [], text, "critical", rx_divergence(ctx, nums, th), nums)]


def rule_not_learning(record: Record, ctx: Context, th: Thresholds) -> list[Finding]:
    """The loss stays at the trivial baseline: no better than the best constant prediction
    (``record.meta["trivial_loss"]``, computed from the data by the training loop)."""
    trivial = record.meta.get("trivial_loss")
    if trivial is None or not math.isfinite(float(trivial)) or record.meta.get("diverged_step") \
            is not None:
        return []
    trivial = float(trivial)
    steps, v = record.scalar("loss")
    ok = np.isfinite(v)
    steps, v = steps[ok], v[ok]
    if len(v) < 4:
        return []
    tsteps, tail = _tail(steps, v, 0.25)
    end = float(np.median(tail))
    margin = th.not_learning_margin
    if end < trivial - margin * abs(trivial):
        return []
    start = float(np.median(v[:3]))
    nums = {"loss_end": end, "loss_start": start, "trivial_loss": trivial,
            "end_over_trivial": end / trivial if trivial else math.nan,
            "tail_steps": len(tsteps)}
    kind = str(record.meta.get("trivial_kind") or "the best constant prediction")
    where = ("above it: worse than" if end > trivial + margin * abs(trivial) else "at")
    text = (f"The model is not learning: the training loss ends at {fmt(end, 3)} (median of the "
            f"last {len(tsteps)} recorded steps; {fmt(start, 3)} at the start), {where} the "
            f"trivial baseline {fmt(trivial, 3)}, the loss of the {kind}. It has learned "
            "nothing a constant output would not: either the steps do not reach the weights "
            "that matter, or the targets carry no signal the model can use.")
    if ctx.transformer and ctx.norm_placement == "post":
        nums["post_ln"] = 1
        text += (" The model is a post-LN transformer (norm after each residual sum), which "
                 "often stalls like this without warm-up (Xiong et al. 2020).")
    return [Finding("not_learning", [], text, "warning", rx_not_learning(ctx, nums, th), nums)]


#: Findings that explain a loss stuck at the baseline.
_CAUSES = ("nonfinite", "divergence", "exploding_gradients", "vanishing_gradients", "saturation",
           "dead_units")


def _not_learning_as_symptom(findings: list[Finding]) -> None:
    """``not_learning`` is a symptom: beside a finding that explains it, it becomes ``info`` (its
    remedies then weigh little in the merged ranking) and names the likely causes (unless the
    architecture is itself the likely cause: a post-LN transformer)."""
    causes = [f.kind for f in findings if f.kind in _CAUSES]
    for i, f in enumerate(findings):
        # a post-LN transformer's placement is itself a likely cause: the finding stays
        if f.kind == "not_learning" and causes and not f.numbers.get("post_ln"):
            text = f.evidence + f" Likely cause: {', '.join(dict.fromkeys(causes))} (above)."
            findings[i] = dataclasses.replace(f, evidence=text, severity="info",
                                              numbers={**f.numbers, "n_causes": len(causes)})


# --- update / weight ratio ---------------------------------------------------------------------
def rule_update_ratio(
    record: Record, ctx: Context, th: Thresholds, explained: set[str]
) -> list[Finding]:
    """Weight matrices whose relative update per step is far from ~1e-3."""
    params = [ctx.weight_params[m] for m in ctx.weight_layers]
    have = set(record.layer_names(metric="update_ratio"))
    params = [p for p in params if p in have]
    if not params:
        return []
    _, _, m = record.matrix("update_ratio", params)
    _, _, w = record.matrix("weight_norm", params)
    if w.shape == m.shape:
        # a zero weight matrix has an undefined ratio
        m = np.where(np.isfinite(w) & (w > 0), m, np.nan)
    med = _nanmedian(np.where(np.isfinite(m), m, np.nan))
    high = [params[j] for j in range(len(params)) if med[j] > th.update_ratio_high]
    low = [params[j] for j in range(len(params))
           if med[j] < th.update_ratio_low and params[j] not in explained
           and ctx.weight_layers[j] not in explained]
    if not high and not low:
        return []
    fin = med[np.isfinite(med)]
    nums = {"n_high": len(high), "n_low": len(low),
            "max_ratio": float(fin.max()) if fin.size else math.nan,
            "min_ratio": float(fin.min()) if fin.size else math.nan}
    parts = []
    if high:
        verb = "changes" if len(high) == 1 else "change"
        its = "its" if len(high) == 1 else "their"
        parts.append(f"{ctx.label(high).capitalize()} {verb} by more than "
                     f"{fmt(th.update_ratio_high)} of {its} norm per step (median up to "
                     f"{fmt(nums['max_ratio'])}; ~1e-3 is typical of healthy training)")
    if low:
        verb = "barely moves" if len(low) == 1 else "barely move"
        parts.append(f"{ctx.label(low).capitalize()} {verb}: median ||dW||/||W|| down to "
                     f"{fmt(nums['min_ratio'])} per step")
    sev = "warning" if high else "info"
    if high and nums["max_ratio"] > 1.0:
        sev = "critical"
    mods = [record.layers[p].module or p for p in high + low]
    return [Finding("update_ratio", mods, "; ".join(parts) + ".", sev,
                    rx_update_ratio(ctx, nums, th), nums)]


def _without_skipped(record: Record) -> Record:
    """The record without the steps a GradScaler skipped (inf/NaN gradients that the scaler
    caught and that never reached the weights: its normal operation, not a fault)."""
    skipped = [s for s, row in record.data.items() if row.get(MODEL, {}).get("skipped_step")]
    if not skipped:
        return record
    meta = dict(record.meta)
    meta["skipped_steps"] = len(skipped)
    drop = set(skipped)
    return Record(layers=record.layers,
                  data={s: row for s, row in record.data.items() if s not in drop}, meta=meta)


def diagnose(
    record: Record,
    thresholds: Thresholds | Mapping[str, Any] | None = None,
) -> list[Finding]:
    """Turn a record into findings, most severe first.

    Args:
        record: Measurements from a :class:`~signalprop.probe.Probe` (or built by hand with the
            metric names of :mod:`signalprop.record`).
        thresholds: A :class:`Thresholds`, a mapping of fields to override, or ``None``.

    Returns:
        Findings sorted by severity (critical first), then by kind order :data:`KINDS`. An empty
        list means no rule fired.

    Raises:
        TypeError: if ``record`` is not a Record.
        ValueError: for an unknown threshold name or a non-positive threshold.
    """
    if not isinstance(record, Record):
        raise TypeError(f"diagnose needs a signalprop Record, got {type(record).__name__}")
    th = Thresholds.coerce(thresholds)
    record = _without_skipped(record)
    ctx = context_of(record)
    findings: list[Finding] = []
    findings += rule_nonfinite(record, ctx, th)
    if not findings:
        findings += rule_divergence(record, ctx, th)
    findings += rule_not_learning(record, ctx, th)
    findings += rule_gradients(record, ctx, th)
    findings += rule_through_time(record, ctx, th)
    findings += rule_saturation(record, ctx, th)
    findings += rule_dead(record, ctx, th)
    explained = {n for f in findings if f.kind == "vanishing_gradients" for n in f.layers}
    findings += rule_update_ratio(record, ctx, th, explained)
    _not_learning_as_symptom(findings)
    findings.sort(key=lambda f: (-severity_rank(f.severity), KINDS.index(f.kind)))
    return findings
