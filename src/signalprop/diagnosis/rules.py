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

from signalprop.diagnosis.context import Context, context_of, finite, fmt, pct
from signalprop.diagnosis.findings import KINDS, Finding, severity_rank
from signalprop.diagnosis.prescriptions import (
    rx_dead,
    rx_divergence,
    rx_exploding,
    rx_nonfinite,
    rx_not_learning,
    rx_saturation,
    rx_through_time,
    rx_update_ratio,
    rx_vanishing,
)
from signalprop.diagnosis.thresholds import Thresholds
from signalprop.record import MODEL, TIME_PREFIX, Record


def _nanmedian(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Median over ``axis`` ignoring NaN (all-NaN slices give NaN without a warning)."""
    a = np.asarray(a, dtype=np.float64)
    out = np.full(np.delete(a.shape, axis), np.nan)
    moved = np.moveaxis(a, axis, -1)
    for idx in np.ndindex(out.shape):
        v = moved[idx]
        v = v[~np.isnan(v)]
        if v.size:
            out[idx] = np.median(v)
    return out


def _tail(steps: np.ndarray, values: np.ndarray, frac: float) -> tuple[np.ndarray, np.ndarray]:
    """The last ``frac`` of recorded steps (at least one)."""
    k = max(1, int(math.ceil(len(steps) * frac)))
    return steps[-k:], values[-k:]


# --- gradients across depth -------------------------------------------------------------------
def _depth_gradients(record: Record, ctx: Context) -> tuple[str, np.ndarray, np.ndarray] | None:
    """Backward signal per weight layer: ``(metric, steps [S], G [S, L])``.

    Uses ``out_grad_norm`` (||dL/dh|| at each weight layer's output) when recorded for every
    weight layer, else the weight gradient ``grad_norm`` (||dL/dW||). Returns ``None`` with fewer
    than two weight layers or no data.
    """
    if ctx.depth < 2:
        return None
    mods = ctx.weight_layers
    have = set(record.layer_names(metric="out_grad_norm"))
    if all(m in have for m in mods):
        steps, _, g = record.matrix("out_grad_norm", mods)
        metric = "out_grad_norm"
    elif mods[0] in have and mods[-1] in have and sum(m in have for m in mods) >= 2 and all(
            m in have or record.layers.get(ctx.weight_params[m]) is not None
            and record.layers[ctx.weight_params[m]].module == ctx.weight_params[m]
            for m in mods):
        # parameters acting without a module call of their own (a positional embedding) have
        # no output to measure: the ends of the path and every module on it still do
        steps, _, g = record.matrix("out_grad_norm", mods)
        metric = "out_grad_norm"
    else:
        params = [ctx.weight_params[m] for m in mods]
        have = set(record.layer_names(metric="grad_norm"))
        if not all(p in have for p in params):
            return None
        steps, _, g = record.matrix("grad_norm", params)
        metric = "grad_norm"
    if g.size == 0:
        return None
    return metric, steps, g


def _log_ratios(g: np.ndarray) -> np.ndarray:
    """log10(G[:, l] / G[:, -1]) per step; NaN where the step is unusable (non-finite, or the
    reference layer's gradient is 0). A layer with exactly zero gradient gives -inf."""
    ref = g[:, -1:]
    # a column never measured (a parameter without an output of its own) does not make a step
    # unusable; a non-finite value anywhere else does
    cols = ~np.isnan(g).all(axis=0)
    ok = np.isfinite(g[:, cols]).all(axis=1, keepdims=True) & (ref > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log10(g) - np.log10(ref)
    return np.where(ok, lr, np.nan)


def _median_ratio(log_r: np.ndarray) -> float:
    """10 ** median of log10 ratios over finite-or-(-inf) entries (NaN skipped)."""
    v = log_r[~np.isnan(log_r)]
    if v.size == 0:
        return math.nan
    m = float(np.median(v))
    return 0.0 if m == -math.inf else 10.0**m


def _per_layer_factor(g: np.ndarray) -> float:
    """Geometric per-layer growth of the gradient from input to output side, as 10 ** (median
    over steps of the least-squares slope of log10 G vs layer index, over layers with G > 0).
    A value below 1 means each layer *shrinks* the backward signal by that factor."""
    slopes = []
    idx = np.arange(g.shape[1], dtype=np.float64)
    for row in g:
        m = np.isfinite(row) & (row > 0)
        if m.sum() >= 2:
            slopes.append(np.polyfit(idx[m], np.log10(row[m]), 1)[0])
    if not slopes:
        return math.nan
    # the fit runs input -> output; the backward factor per layer is its inverse
    return float(10.0 ** (-np.median(slopes)))


def _weight_grad_ratio(record: Record, ctx: Context) -> float:
    params = [ctx.weight_params[m] for m in ctx.weight_layers]
    have = set(record.layer_names(metric="grad_norm"))
    if len(params) < 2 or not all(p in have for p in params):
        return math.nan
    _, _, g = record.matrix("grad_norm", [params[0], params[-1]])
    return _median_ratio(_log_ratios(g)[:, 0])


def _min_grad_rms(record: Record, ctx: Context) -> float:
    """Smallest median per-element RMS weight gradient ||dL/dW|| / sqrt(numel) over weight
    layers (0 if some layer's gradient underflowed to exactly zero)."""
    best = math.inf
    for m in ctx.weight_layers:
        p = ctx.weight_params[m]
        info = record.layers.get(p)
        _, v = record.series(p, "grad_norm")
        v = finite(v)
        if info is None or info.shape is None or v.size == 0:
            continue
        best = min(best, float(np.median(v)) / math.sqrt(max(1, int(np.prod(info.shape)))))
    return best if best < math.inf else math.nan


def _forward_growth(record: Record, ctx: Context) -> float:
    """out_std of the last weight layer's output over that of the first, at the first step."""
    a = record.layers and ctx.weight_layers
    if not a or len(ctx.weight_layers) < 2:
        return math.nan
    s0 = record.steps[0] if record.steps else None
    if s0 is None:
        return math.nan
    first = record.get(s0, ctx.weight_layers[0], "out_std")
    last = record.get(s0, ctx.weight_layers[-1], "out_std")
    if not (math.isfinite(first) and math.isfinite(last)) or first <= 0:
        return math.nan
    return last / first


def _block_ratio(record: Record, ctx: Context) -> float:
    """Median over steps of ||dL/dx|| at the first residual block's input over the last's."""
    if len(ctx.residual_blocks) < 2:
        return math.nan
    a, b = ctx.residual_blocks[0], ctx.residual_blocks[-1]
    if not record.has("in_grad_norm"):
        return math.nan
    _, _, g = record.matrix("in_grad_norm", [a, b])
    if g.size == 0:
        return math.nan
    return _median_ratio(_log_ratios(g)[:, 0])


def rule_gradients(record: Record, ctx: Context, th: Thresholds) -> list[Finding]:
    """Vanishing or exploding gradients across depth, and gradient growth over training."""
    out: list[Finding] = []
    dg = _depth_gradients(record, ctx)
    if dg is not None and ctx.depth >= th.min_layers:
        metric, steps, g = dg
        log_r = _log_ratios(g)
        usable = int((~np.isnan(log_r[:, 0])).sum())
        if usable:
            ratio = _median_ratio(log_r[:, 0])
            with np.errstate(invalid="ignore"):
                rel = np.array([_median_ratio(log_r[:, j]) for j in range(g.shape[1])])
            factor = _per_layer_factor(g)
            zero_layers = int(np.sum(_nanmedian(np.where(np.isfinite(g), g, np.nan)) == 0))
            dw = _weight_grad_ratio(record, ctx)
            what = "||dL/dh||" if metric == "out_grad_norm" else "||dL/dW||"
            first, last = ctx.weight_layers[0], ctx.weight_layers[-1]
            nums: dict[str, Any] = {
                "ratio": ratio,
                "ratio_dW": dw,
                "per_layer_factor": factor,
                "n_layers": ctx.depth,
                "steps_used": usable,
                "zero_gradient_layers": zero_layers,
                "sigma_w2": ctx.sigma_w2,
            }
            if ratio < th.vanishing_ratio:
                flagged = [ctx.weight_layers[j] for j in range(g.shape[1])
                           if rel[j] < th.vanishing_ratio]
                nums["min_grad_rms"] = _min_grad_rms(record, ctx)
                nums["n_flagged"] = len(flagged)
                if ratio > 0:
                    text = (
                        f"Gradients vanish toward the input: {what} at layer 1 ({first!r}) is "
                        f"{fmt(ratio)}x that at layer {ctx.depth} ({last!r}) (median over "
                        f"{usable} recorded steps)"
                    )
                else:
                    nz = [j for j in range(len(rel)) if rel[j] > 0]
                    text = (
                        f"Gradients vanish toward the input: {what} at layer 1 ({first!r}) "
                        f"is exactly 0 (median over {usable} recorded steps: underflow or a dead path)"
                    )
                    if nz and nz[0] < len(rel) - 1:
                        text += (f"; the first layer with a non-zero gradient, layer {nz[0] + 1}"
                                 f", gets {fmt(float(rel[nz[0]]))}x the gradient of layer "
                                 f"{ctx.depth} ({last!r})")
                        nums["first_nonzero_layer"] = nz[0] + 1
                        nums["first_nonzero_ratio"] = float(rel[nz[0]])
                if dw == dw and metric == "out_grad_norm":
                    text += ("; dL/dW of layer 1 is exactly 0" if dw == 0 else
                             f"; dL/dW of layer 1 is {fmt(dw)}x that of layer {ctx.depth}")
                br = _block_ratio(record, ctx)
                if br == br:
                    nums["block_ratio"] = br
                    text += (f"; along the residual stream, ||dL/dx|| at the input of the first "
                             f"block ({ctx.residual_blocks[0]!r}) is {fmt(br)}x that at the last "
                             f"({ctx.residual_blocks[-1]!r})")
                text += "."
                if factor == factor:
                    text += (f" Each layer multiplies the backward signal by ~{fmt(factor)}"
                             f" on average.")
                text += (f" {ctx.label(flagged).capitalize()} get less than "
                         f"{fmt(th.vanishing_ratio)}x the last layer's gradient.")
                if zero_layers:
                    text += (f" {zero_layers} layer(s) receive exactly zero gradient "
                             "(underflow or dead paths): they cannot learn at all.")
                sev = "critical" if ratio < th.vanishing_critical_ratio else "warning"
                out.append(Finding("vanishing_gradients", flagged, text, sev,
                                   rx_vanishing(ctx, nums, th), nums))
            elif ratio > th.exploding_ratio:
                flagged = [ctx.weight_layers[j] for j in range(g.shape[1])
                           if rel[j] > th.exploding_ratio]
                nums["forward_growth"] = _forward_growth(record, ctx)
                nums["n_flagged"] = len(flagged)
                text = (
                    f"Gradients explode toward the input: {what} at layer 1 ({first!r}) is "
                    f"{fmt(ratio)}x that at layer {ctx.depth} ({last!r}) (median over {usable} "
                    f"recorded steps); each layer multiplies the backward signal by "
                    f"~{fmt(factor)}."
                )
                fg = nums["forward_growth"]
                if fg == fg and fg > 10:
                    text += f" Forward activations grow too: out_std x{fmt(fg)} across depth."
                sev = "critical" if ratio > th.exploding_critical_ratio else "warning"
                out.append(Finding("exploding_gradients", flagged, text, sev,
                                   rx_exploding(ctx, nums, th), nums))
    # growth of the total gradient norm over training (no depth needed)
    if not any(f.kind == "exploding_gradients" for f in out):
        steps, v = record.scalar("grad_norm_total")
        ok = np.isfinite(v) & (v > 0)
        if ok.sum() >= 2:
            s, v = steps[ok], v[ok]
            growth = float(v.max() / v[0])
            if growth > th.growth_ratio:
                at = int(s[int(np.argmax(v))])
                nums = {"growth": growth, "initial": float(v[0]), "peak": float(v.max()),
                        "peak_step": at, "forward_growth": _forward_growth(record, ctx)}
                text = (
                    f"The total gradient norm grew {fmt(growth)}x during training, from "
                    f"{fmt(float(v[0]))} at step {int(s[0])} to {fmt(float(v.max()))} at step "
                    f"{at}."
                )
                sev = "critical" if growth > th.exploding_critical_ratio else "warning"
                out.append(Finding("exploding_gradients", list(ctx.weight_layers), text, sev,
                                   rx_exploding(ctx, nums, th), nums))
    return out


# --- recurrent layers: gradients through time --------------------------------------------------
def _time_matrix(record: Record, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps [S], t [T], G [S, T])``: ||dL/dh_t|| of a recurrent layer per recorded step
    (NaN where a time step was not recorded at a step)."""
    ts: set[int] = set()
    rows = []
    for s in record.steps:
        d = record.data[s].get(layer, {})
        prof = {int(m[len(TIME_PREFIX):]): v for m, v in d.items() if m.startswith(TIME_PREFIX)}
        if len(prof) >= 2:
            rows.append((s, prof))
            ts |= set(prof)
    t = np.asarray(sorted(ts), dtype=np.int64)
    g = np.full((len(rows), len(t)), np.nan)
    col = {int(v): j for j, v in enumerate(t)}
    for i, (_, prof) in enumerate(rows):
        for k, v in prof.items():
            g[i, col[k]] = v
    return np.asarray([s for s, _ in rows], dtype=np.int64), t, g


def rule_through_time(record: Record, ctx: Context, th: Thresholds) -> list[Finding]:
    """||dL/dh_t|| at the first time step against the last one, per recurrent layer."""
    out: list[Finding] = []
    for name, info in record.layers.items():
        if info.role != "module" or not info.time_steps:
            continue
        steps, t, g = _time_matrix(record, name)
        if g.size == 0 or len(t) < 2:
            continue
        # the reference is the last time step (nearest the loss for sequence-to-one tasks)
        ok = np.isfinite(g[:, [0, -1]]).all(axis=1) & (g[:, -1] > 0)
        if not ok.any():
            continue
        with np.errstate(divide="ignore"):
            lr = np.log10(g[ok, 0]) - np.log10(g[ok, -1])
        ratio = _median_ratio(lr)
        T = int(t[-1]) + 1
        usable = int(ok.sum())
        exploding = ratio > th.exploding_ratio
        if not (ratio < th.vanishing_ratio or exploding):
            continue
        per_step = ratio ** (1.0 / (T - 1)) if ratio > 0 else 0.0
        nums: dict[str, Any] = {"ratio": ratio, "per_step_factor": per_step, "time_steps": T,
                                "steps_used": usable, "t_first": int(t[0]), "t_last": int(t[-1])}
        med = _nanmedian(np.where(np.isfinite(g[ok]), g[ok], np.nan))
        text = (f"Gradients {'explode' if exploding else 'vanish'} through time in {name!r} "
                f"({info.type}): ||dL/dh_t|| at t={int(t[0])} is "
                f"{'exactly 0' if ratio == 0 else fmt(ratio) + 'x'} that at t={int(t[-1])} "
                f"(median over {usable} recorded steps)")
        if ratio > 0:
            text += f"; each time step multiplies it by ~{fmt(per_step)}"
        else:
            nz = np.nonzero(med > 0)[0]
            if nz.size:
                nums["first_nonzero_t"] = int(t[nz[0]])
                text += (f"; the gradient reaches back only to t={int(t[nz[0]])}, "
                         f"{int(t[-1]) - int(t[nz[0]])} steps before the end")
        text += "."
        cell = {"RNN": "RNN", "RNNCell": "RNN", "LSTM": "LSTM", "LSTMCell": "LSTM",
                "GRU": "GRU", "GRUCell": "GRU"}.get(info.type)
        gates = []
        for gname in ("f", "i", "o", "z", "r"):
            _, v = record.series(name, f"gate_{gname}_mean")
            _, sv = record.series(name, f"gate_{gname}_saturated_frac")
            v, sv = finite(v), finite(sv)
            if v.size:
                nums[f"gate_{gname}_mean"] = float(np.median(v))
                gates.append(f"{gname} {fmt(float(np.median(v)))}")
                if sv.size:
                    nums[f"gate_{gname}_saturated_frac"] = float(np.median(sv))
        if "gate_f_mean" in nums:
            nums["forget_gate_mean"] = nums["gate_f_mean"]
        if gates:
            text += f" Mean gate values: {', '.join(gates)}."
        sev_critical = (ratio > th.exploding_critical_ratio if exploding
                        else ratio < th.vanishing_critical_ratio)
        kind = "exploding_through_time" if exploding else "vanishing_through_time"
        out.append(Finding(kind, [name], text, "critical" if sev_critical else "warning",
                           rx_through_time(ctx, nums, th, exploding=exploding, cell=cell), nums))
    return out


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
    text = (
        f"{pct(nums['mean_fraction'])} of units in {ctx.label(flagged)} "
        f"({nums['n_flagged']} of {nums['n_layers']} {'/'.join(kinds)} layers) are saturated "
        f"(|phi'(z)| < {fmt(float(ratio))} x its maximum; median over the last "
        f"{nums['tail_steps']} recorded steps, from step {nums['first_tail_step']}); at the "
        f"first step: {pct(nums['initial_fraction'])}. Saturated units pass almost no gradient."
    )
    sev = "critical" if nums["mean_fraction"] >= th.saturation_critical_fraction else "warning"
    return [Finding("saturation", flagged, text, sev, rx_saturation(ctx, nums, th), nums)]


def rule_dead(record: Record, ctx: Context, th: Thresholds) -> list[Finding]:
    """Rectifier units that output zero for every example of a batch."""
    r = _fraction_rule(record, ctx, th, "dead_frac", th.dead_fraction, th.dead_critical_fraction)
    if r is None:
        return []
    flagged, nums, layers = r
    text = (
        f"{pct(nums['mean_fraction'])} of units in {ctx.label(flagged)} ({nums['n_flagged']} "
        f"of {nums['n_layers']} rectifier layers) are dead: zero output for every example of "
        f"the batch (median over the last {nums['tail_steps']} recorded steps); at the first "
        f"step: {pct(nums['initial_fraction'])}. Dead units get no gradient and never recover."
    )
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
    order = {n: i for i, n in enumerate(record.layers)}
    first_step: int | None = None
    bad_steps = 0
    fwd_layers: list[str] = []
    any_layers: list[str] = []
    in_loss = False
    for s in record.steps:
        row = record.data[s]
        loss = row.get(MODEL, {}).get("loss")
        bad_loss = loss is not None and not math.isfinite(loss)
        bad = [n for n, d in row.items() if n != MODEL and _bad(d)]
        if bad_loss or bad:
            bad_steps += 1
            if first_step is None:
                first_step = s
                bad.sort(key=lambda n: order.get(n, len(order)))
                any_layers = bad
                fwd_layers = [
                    n for n in bad
                    if row[n].get("out_nonfinite", 0.0) > 0
                    or not math.isfinite(row[n].get("out_mean", 0.0))
                ]
                # a non-finite loss over a finite forward pass (its outputs were measured): the
                # loss function made it (log of 0, division by zero), not the first layer whose
                # gradient it then poisoned
                seen_fwd = any("out_mean" in d for n, d in row.items() if n != MODEL)
                in_loss = bad_loss and seen_fwd and not fwd_layers
    data_bad = float(record.meta.get("data_nonfinite", 0) or 0)
    # a run stopped for a loss above the divergence bound is the divergence rule's
    diverged_step = record.meta.get("diverged_step") if record.meta.get(
        "diverged_reason") in (None, "nonfinite") else None
    if first_step is None and not data_bad and diverged_step is None:
        return []
    if first_step is None:
        first_step = int(diverged_step) if diverged_step is not None else -1
    mods_in_order = [n for n in record.layers if record.layers[n].role != "param"]
    at_input = bool(fwd_layers) and bool(mods_in_order) and fwd_layers[0] == mods_in_order[0]
    first_params_ok = True
    if at_input:
        # the first module's own weights were finite: the non-finite values came in with x
        for p, info in record.layers.items():
            if info.role == "param" and info.module == mods_in_order[0]:
                w = record.get(first_step, p, "weight_norm")
                first_params_ok &= not (w == w) or math.isfinite(w)
        at_input = first_params_ok
    nums: dict[str, Any] = {
        "first_step": first_step,
        "bad_steps": bad_steps,
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
    parts = [f"Non-finite values (NaN/Inf) from step {first_step}"
             f" ({bad_steps} of {len(record.steps)} recorded steps affected)"]
    nums["in_loss"] = int(in_loss)
    if fwd_layers:
        parts.append(f"first in the forward pass of {fwd_layers[0]!r} "
                     f"({ctx.label(fwd_layers[:1])})")
    elif in_loss:
        parts.append("first in the loss: the model's outputs were finite and the loss function "
                     "returned NaN/Inf (look for log of 0 or of a negative number, a division "
                     "by zero or sqrt of a negative number in the loss)")
    elif any_layers:
        parts.append(f"first in {any_layers[0]!r}")
    text = "; ".join(parts) + "."
    if data_bad:
        text += (f" The input data contain {int(data_bad)} NaN/Inf entries: clean or impute "
                 "them (no training remedy can).")
    elif at_input:
        text += (" The very first layer's output is non-finite while its weights are finite: "
                 "the inputs are the likely source; check the data.")
    elif "grad_growth_before" in nums:
        text += (f" The total gradient norm grew {fmt(nums['grad_growth_before'])}x before "
                 "that, a sign of divergence.")
    if "last_finite_loss" in nums:
        text += (f" Loss went from {fmt(nums['initial_loss'])} to {fmt(nums['last_finite_loss'])}"
                 f" before becoming non-finite.")
    layers = fwd_layers or ([] if in_loss else any_layers)
    return [Finding("nonfinite", layers, text, "critical", rx_nonfinite(ctx, nums, th), nums)]


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
