"""Diagnosis rules about gradients: across depth (vanishing, exploding) and, in recurrent
layers, through time. Part of :mod:`signalprop.diagnosis.rules` (which runs them)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from signalprop.diagnosis.context import Context, finite, fmt
from signalprop.diagnosis.findings import Finding
from signalprop.diagnosis.prescriptions import (
    rx_exploding,
    rx_through_time,
    rx_vanishing,
)
from signalprop.diagnosis.thresholds import Thresholds
from signalprop.record import TIME_PREFIX, Record


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
        found = _depth_finding(record, ctx, th, dg[0], dg[2])
        if found is not None:
            out.append(found)
    # growth of the total gradient norm over training (no depth needed)
    if not any(f.kind == "exploding_gradients" for f in out):
        found = _growth_finding(record, ctx, th)
        if found is not None:
            out.append(found)
    return out


def _depth_finding(record: Record, ctx: Context, th: Thresholds, metric: str,
                   g: np.ndarray) -> Finding | None:
    """Vanishing or exploding gradients across depth from the backward signal ``g`` [S, L]."""
    log_r = _log_ratios(g)
    usable = int((~np.isnan(log_r[:, 0])).sum())
    if not usable:
        return None
    ratio = _median_ratio(log_r[:, 0])
    with np.errstate(invalid="ignore"):
        rel = np.array([_median_ratio(log_r[:, j]) for j in range(g.shape[1])])
    nums: dict[str, Any] = {
        "ratio": ratio,
        "ratio_dW": _weight_grad_ratio(record, ctx),
        "per_layer_factor": _per_layer_factor(g),
        "n_layers": ctx.depth,
        "steps_used": usable,
        "zero_gradient_layers": int(np.sum(_nanmedian(np.where(np.isfinite(g), g, np.nan)) == 0)),
        "sigma_w2": ctx.sigma_w2,
    }
    if ratio < th.vanishing_ratio:
        flagged = [ctx.weight_layers[j] for j in range(g.shape[1]) if rel[j] < th.vanishing_ratio]
        _measure_vanishing(record, ctx, nums, rel, flagged)
        sev = "critical" if ratio < th.vanishing_critical_ratio else "warning"
        return Finding("vanishing_gradients", flagged,
                       _say_vanishing(ctx, nums, metric, flagged, th), sev,
                       rx_vanishing(ctx, nums, th), nums)
    if ratio > th.exploding_ratio:
        flagged = [ctx.weight_layers[j] for j in range(g.shape[1]) if rel[j] > th.exploding_ratio]
        nums["forward_growth"] = _forward_growth(record, ctx)
        nums["n_flagged"] = len(flagged)
        sev = "critical" if ratio > th.exploding_critical_ratio else "warning"
        return Finding("exploding_gradients", flagged, _say_exploding(ctx, nums, metric), sev,
                       rx_exploding(ctx, nums, th), nums)
    return None


def _measure_vanishing(record: Record, ctx: Context, nums: dict[str, Any], rel: np.ndarray,
                       flagged: list[str]) -> None:
    """The numbers a vanishing finding adds: the smallest gradient RMS, the first layer that
    still gets a gradient (when layer 1 gets none) and the residual stream's ratio."""
    nums["min_grad_rms"] = _min_grad_rms(record, ctx)
    nums["n_flagged"] = len(flagged)
    if not nums["ratio"] > 0:
        nz = [j for j in range(len(rel)) if rel[j] > 0]
        if nz and nz[0] < len(rel) - 1:
            nums["first_nonzero_layer"] = nz[0] + 1
            nums["first_nonzero_ratio"] = float(rel[nz[0]])
    br = _block_ratio(record, ctx)
    if br == br:
        nums["block_ratio"] = br


def _what(metric: str) -> str:
    return "||dL/dh||" if metric == "out_grad_norm" else "||dL/dW||"


def _say_vanishing(ctx: Context, nums: dict[str, Any], metric: str, flagged: list[str],
                   th: Thresholds) -> str:
    """The vanishing finding in words, from its numbers."""
    what, ratio, usable = _what(metric), nums["ratio"], nums["steps_used"]
    first, last = ctx.weight_layers[0], ctx.weight_layers[-1]
    if ratio > 0:
        text = (
            f"Gradients vanish toward the input: {what} at layer 1 ({first!r}) is "
            f"{fmt(ratio)}x that at layer {ctx.depth} ({last!r}) (median over "
            f"{usable} recorded steps)"
        )
    else:
        text = (
            f"Gradients vanish toward the input: {what} at layer 1 ({first!r}) "
            f"is exactly 0 (median over {usable} recorded steps: underflow or a dead path)"
        )
        if "first_nonzero_layer" in nums:
            text += (f"; the first layer with a non-zero gradient, layer "
                     f"{nums['first_nonzero_layer']}, gets {fmt(nums['first_nonzero_ratio'])}x "
                     f"the gradient of layer {ctx.depth} ({last!r})")
    dw = nums["ratio_dW"]
    if dw == dw and metric == "out_grad_norm":
        text += ("; dL/dW of layer 1 is exactly 0" if dw == 0 else
                 f"; dL/dW of layer 1 is {fmt(dw)}x that of layer {ctx.depth}")
    if "block_ratio" in nums:
        text += (f"; along the residual stream, ||dL/dx|| at the input of the first "
                 f"block ({ctx.residual_blocks[0]!r}) is {fmt(nums['block_ratio'])}x that at "
                 f"the last ({ctx.residual_blocks[-1]!r})")
    text += "."
    factor = nums["per_layer_factor"]
    if factor == factor:
        text += f" Each layer multiplies the backward signal by ~{fmt(factor)} on average."
    text += (f" {ctx.label(flagged).capitalize()} get less than "
             f"{fmt(th.vanishing_ratio)}x the last layer's gradient.")
    if nums["zero_gradient_layers"]:
        text += (f" {nums['zero_gradient_layers']} layer(s) receive exactly zero gradient "
                 "(underflow or dead paths): they cannot learn at all.")
    return text


def _say_exploding(ctx: Context, nums: dict[str, Any], metric: str) -> str:
    """The exploding finding in words, from its numbers."""
    first, last = ctx.weight_layers[0], ctx.weight_layers[-1]
    text = (
        f"Gradients explode toward the input: {_what(metric)} at layer 1 ({first!r}) is "
        f"{fmt(nums['ratio'])}x that at layer {ctx.depth} ({last!r}) (median over "
        f"{nums['steps_used']} recorded steps); each layer multiplies the backward signal by "
        f"~{fmt(nums['per_layer_factor'])}."
    )
    fg = nums["forward_growth"]
    if fg == fg and fg > 10:
        text += f" Forward activations grow too: out_std x{fmt(fg)} across depth."
    return text


def _growth_finding(record: Record, ctx: Context, th: Thresholds) -> Finding | None:
    """Growth of the total gradient norm over training (no depth needed)."""
    steps, v = record.scalar("grad_norm_total")
    ok = np.isfinite(v) & (v > 0)
    if ok.sum() < 2:
        return None
    s, v = steps[ok], v[ok]
    growth = float(v.max() / v[0])
    if not growth > th.growth_ratio:
        return None
    at = int(s[int(np.argmax(v))])
    nums = {"growth": growth, "initial": float(v[0]), "peak": float(v.max()),
            "peak_step": at, "forward_growth": _forward_growth(record, ctx)}
    text = (
        f"The total gradient norm grew {fmt(growth)}x during training, from "
        f"{fmt(float(v[0]))} at step {int(s[0])} to {fmt(float(v.max()))} at step "
        f"{at}."
    )
    sev = "critical" if growth > th.exploding_critical_ratio else "warning"
    return Finding("exploding_gradients", list(ctx.weight_layers), text, sev,
                   rx_exploding(ctx, nums, th), nums)


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
        nums = _measure_through_time(record, name)
        if nums is None:
            continue
        ratio = nums["ratio"]
        exploding = ratio > th.exploding_ratio
        if not (ratio < th.vanishing_ratio or exploding):
            continue
        nums.update(_gate_stats(record, name))
        if "gate_f_mean" in nums:
            nums["forget_gate_mean"] = nums["gate_f_mean"]
        cell = {"RNN": "RNN", "RNNCell": "RNN", "LSTM": "LSTM", "LSTMCell": "LSTM",
                "GRU": "GRU", "GRUCell": "GRU"}.get(info.type)
        sev_critical = (ratio > th.exploding_critical_ratio if exploding
                        else ratio < th.vanishing_critical_ratio)
        kind = "exploding_through_time" if exploding else "vanishing_through_time"
        out.append(Finding(kind, [name], _say_through_time(name, info.type, nums, exploding),
                           "critical" if sev_critical else "warning",
                           rx_through_time(ctx, nums, th, exploding=exploding, cell=cell), nums))
    return out


def _measure_through_time(record: Record, name: str) -> dict[str, Any] | None:
    """The ratio of ||dL/dh_t|| at the first time step to the last (median over the usable
    recorded steps), per time step, and how far back a vanished gradient reaches."""
    _, t, g = _time_matrix(record, name)
    if g.size == 0 or len(t) < 2:
        return None
    # the reference is the last time step (nearest the loss for sequence-to-one tasks)
    ok = np.isfinite(g[:, [0, -1]]).all(axis=1) & (g[:, -1] > 0)
    if not ok.any():
        return None
    with np.errstate(divide="ignore"):
        lr = np.log10(g[ok, 0]) - np.log10(g[ok, -1])
    ratio = _median_ratio(lr)
    T = int(t[-1]) + 1
    per_step = ratio ** (1.0 / (T - 1)) if ratio > 0 else 0.0
    nums: dict[str, Any] = {"ratio": ratio, "per_step_factor": per_step, "time_steps": T,
                            "steps_used": int(ok.sum()), "t_first": int(t[0]),
                            "t_last": int(t[-1])}
    if not ratio > 0:
        med = _nanmedian(np.where(np.isfinite(g[ok]), g[ok], np.nan))
        nz = np.nonzero(med > 0)[0]
        if nz.size:
            nums["first_nonzero_t"] = int(t[nz[0]])
    return nums


_GATES = ("f", "i", "o", "z", "r")


def _gate_stats(record: Record, name: str) -> dict[str, float]:
    """Median gate values (and saturated fractions) of a recurrent layer, where recorded."""
    out: dict[str, float] = {}
    for gname in _GATES:
        _, v = record.series(name, f"gate_{gname}_mean")
        _, sv = record.series(name, f"gate_{gname}_saturated_frac")
        v, sv = finite(v), finite(sv)
        if v.size:
            out[f"gate_{gname}_mean"] = float(np.median(v))
            if sv.size:
                out[f"gate_{gname}_saturated_frac"] = float(np.median(sv))
    return out


def _say_through_time(name: str, type_: str, nums: dict[str, Any], exploding: bool) -> str:
    """A through-time finding in words, from its numbers."""
    ratio, t0, t1 = nums["ratio"], nums["t_first"], nums["t_last"]
    text = (f"Gradients {'explode' if exploding else 'vanish'} through time in {name!r} "
            f"({type_}): ||dL/dh_t|| at t={t0} is "
            f"{'exactly 0' if ratio == 0 else fmt(ratio) + 'x'} that at t={t1} "
            f"(median over {nums['steps_used']} recorded steps)")
    if ratio > 0:
        text += f"; each time step multiplies it by ~{fmt(nums['per_step_factor'])}"
    elif "first_nonzero_t" in nums:
        nz = nums["first_nonzero_t"]
        text += f"; the gradient reaches back only to t={nz}, {t1 - nz} steps before the end"
    text += "."
    gates = [f"{g} {fmt(nums[f'gate_{g}_mean'])}" for g in _GATES if f"gate_{g}_mean" in nums]
    if gates:
        text += f" Mean gate values: {', '.join(gates)}."
    return text
