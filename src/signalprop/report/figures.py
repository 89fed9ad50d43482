"""Figures drawn from a :class:`~signalprop.record.Record`, shared by the doctor's report and the
lab.

Every figure function takes a record (plus options) and returns a ``matplotlib.figure.Figure``,
or ``None`` when the record lacks what it needs. Each declares the metrics it requires
(``fn.requires``, cockpit's ``requires`` idea), so a caller can list what a record can show::

    from signalprop.report import figures
    for name in figures.available(record):
        fig = figures.FIGURES.get(name)(record)

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI backend), so
they are safe in threads and headless runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from signalprop._registry import Registry
from signalprop.record import Record
from signalprop.stats import SATURATION_DERIVATIVE_RATIO
from signalprop.vocab.activations import ACTIVATIONS, ActivationDef

FigureFn = Callable[..., Figure | None]

#: name -> figure function (each has ``.requires`` and ``.title``).
FIGURES: Registry = Registry("figure")

#: Colours for successive steps (early = light, late = dark).
_CMAP = "viridis"


def requires(*metrics: str, title: str = "", any_of: bool = False) -> Callable[[FigureFn], FigureFn]:
    """Declare the record metrics a figure needs; the wrapped function returns ``None`` when
    they are missing (all of them, or at least one with ``any_of=True``), and registers itself
    in :data:`FIGURES` under its function name."""

    def deco(fn: FigureFn) -> FigureFn:
        @functools.wraps(fn)
        def wrapper(record: Record, *args: Any, **kwargs: Any) -> Figure | None:
            if not can_draw(wrapper, record):
                return None
            return fn(record, *args, **kwargs)

        wrapper.requires = tuple(metrics)  # type: ignore[attr-defined]
        wrapper.any_of = any_of  # type: ignore[attr-defined]
        wrapper.title = title or fn.__name__.replace("_", " ")  # type: ignore[attr-defined]
        FIGURES.register(fn.__name__, wrapper)
        return wrapper

    return deco


def can_draw(fn: FigureFn, record: Record) -> bool:
    """Whether ``record`` has the metrics ``fn`` requires."""
    need = getattr(fn, "requires", ())
    if not need:
        return True
    have = [record.has(m) for m in need]
    return any(have) if getattr(fn, "any_of", False) else all(have)


def available(record: Record) -> list[str]:
    """Names of the registered figures this record can draw (registration order)."""
    return [n for n in FIGURES._entries if can_draw(FIGURES.get(n), record)]


# --- helpers ---------------------------------------------------------------------------------------
def new_figure(width: float = 7.5, height: float = 3.6, ncols: int = 1, nrows: int = 1) -> tuple[
    Figure, Any
]:
    """A ``Figure`` and its axes (no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def pick_steps(steps: Sequence[int], n: int = 5) -> list[int]:
    """About ``n`` steps spread log-uniformly over ``steps`` (always the first and last)."""
    steps = sorted(int(s) for s in steps)
    if len(steps) <= n:
        return steps
    lo, hi = steps[0], steps[-1]
    targets = np.unique(np.round(np.geomspace(lo + 1, hi + 1, n) - 1))
    out = []
    arr = np.asarray(steps)
    for t in targets:
        s = int(arr[np.argmin(np.abs(arr - t))])
        if s not in out:
            out.append(s)
    return out


def layer_label(record: Record, name: str) -> str:
    """``"3 Linear"``-style short label: position among modules + type."""
    info = record.layers.get(name)
    if info is None:
        return name
    short = name if len(name) <= 14 else "…" + name[-13:]
    return f"{short} {info.type}" if info.type not in ("Parameter",) else short


def weight_params(record: Record) -> list[str]:
    """Parameter names with >= 2 dimensions (weight matrices / kernels), forward order."""
    ps = [i for i in record.layers.values() if i.role == "param" and i.shape and len(i.shape) >= 2]
    return [i.name for i in sorted(ps, key=lambda i: i.depth)]


def _positive(v: np.ndarray) -> np.ndarray:
    """NaN where not finite-and-positive (log axes)."""
    v = np.asarray(v, dtype=np.float64)
    return np.where(np.isfinite(v) & (v > 0), v, np.nan)


def _mark_zeros(ax: Any, x: np.ndarray, m: np.ndarray) -> None:
    """Red triangles at the bottom for layers whose value is exactly 0 at some step (a log axis
    cannot show them, and an invisible point would read as 'not measured')."""
    pos = _positive(m)
    if not np.isfinite(pos).any():
        return
    zeros = (np.isfinite(m) & (m == 0)).any(axis=0)
    if zeros.any():
        ax.scatter(x[zeros], np.full(int(zeros.sum()), np.nanmin(pos)), marker="v", color="red",
                   s=18, label="exactly 0", zorder=3)


def _step_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cm = colormaps[_CMAP]
    return [cm(0.15 + 0.7 * i / max(1, n - 1)) for i in range(n)]


def _index_axis(ax: Any, labels: Sequence[str], max_ticks: int = 16) -> None:
    k = max(1, math.ceil(len(labels) / max_ticks))
    ticks = list(range(0, len(labels), k))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(i + 1) for i in ticks])


# --- figures ------------------------------------------------------------------------------------------
@requires("loss", title="Training loss")
def loss_curve(record: Record, ax: Any = None) -> Figure | None:
    """Loss per recorded step (log scale when positive); non-finite steps marked in red."""
    steps, loss = record.scalar("loss")
    if steps.size == 0:
        return None
    fig, axes = new_figure(7.5, 3.0)
    ax = axes[0, 0]
    ok = np.isfinite(loss)
    ax.plot(steps[ok], loss[ok], color="C0", lw=1.4, label="loss")
    if (~ok).any():
        ymax = np.nanmax(np.where(ok, loss, np.nan)) if ok.any() else 1.0
        ax.scatter(steps[~ok], np.full((~ok).sum(), ymax), color="red", marker="x",
                   label="non-finite loss", zorder=3)
    if ok.any() and (loss[ok] > 0).all() and loss[ok].max() > 10 * loss[ok].min():
        ax.set_yscale("log")  # only when the loss spans a decade: else log ticks are unreadable
    acc_steps, acc = record.scalar("accuracy")
    if acc_steps.size:
        ax2 = ax.twinx()
        ax2.plot(acc_steps, acc, color="C2", lw=1.0, alpha=0.8, label="train accuracy (batch)")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("accuracy", color="C2")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


@requires("out_grad_norm", "grad_norm", title="Gradient flow", any_of=True)
def gradient_flow(record: Record, steps: Sequence[int] | None = None, n_steps: int = 5) -> (
    Figure | None
):
    """Per-layer gradient norms (log scale) at several steps: ||dL/dW|| of every weight matrix
    and, when recorded, ||dL/dh|| of every weight layer's output. A healthy net's lines are
    flat; vanishing gradients slope up toward the output, exploding ones down."""
    panels = []
    wp = weight_params(record)
    if wp and record.has("grad_norm"):
        panels.append(("grad_norm", wp, "||dL/dW|| per weight matrix"))
    mods = [record.layers[p].module for p in wp if record.layers[p].module in record.layers]
    mods = [m for m in mods if m in set(record.layer_names(metric="out_grad_norm"))]
    if not mods:
        mods = record.layer_names(role="module", metric="out_grad_norm")
    if mods:
        panels.append(("out_grad_norm", mods, "||dL/dh|| at each layer's output"))
    if not panels:
        return None
    fig, axes = new_figure(4.2 * len(panels), 3.6, ncols=len(panels))
    for k, (metric, layers, title) in enumerate(panels):
        ax = axes[0, k]
        st, _, m = record.matrix(metric, layers)
        if st.size == 0:
            continue
        chosen = list(steps) if steps is not None else pick_steps(st.tolist(), n_steps)
        colors = _step_colors(len(chosen))
        x = np.arange(1, len(layers) + 1)
        for c, s in zip(colors, chosen, strict=True):
            idx = np.nonzero(st == s)[0]
            if idx.size:
                ax.plot(x, _positive(m[idx[0]]), "-o", ms=2.5, lw=1.2, color=c, label=f"step {s}")
        ax.set_yscale("log")
        ax.set_xlabel("layer (input → output)")
        ax.set_ylabel("norm (log)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        _mark_zeros(ax, x, m)
        ax.set_xlim(0.5, len(layers) + 0.5)
        ax.legend(fontsize=7, loc="best")
    return fig


@requires("out_grad_norm", "out_std", "weight_norm", title="Theory vs measurement")
def theory_vs_measurement(record: Record, explanation: Any = None, model: Any = None) -> (
    Figure | None
):
    """Predicted (mean-field, :func:`signalprop.diagnosis.explain.explain`) and measured
    ||dL/dh|| per weight layer, log scale, at init and at the end of the run. The prediction is
    anchored at the last layer's measured norm and multiplied by sqrt(chi_l) towards the input.

    Args:
        record: A probe record.
        explanation: A precomputed ``Explanation`` (default: computed from ``record``).
        model: The model, to resolve custom activation modules when computing it here.
    """
    if explanation is None:
        # lazy: the diagnosis imports torch (~3 s; this module ~1 s): only this figure needs it
        from signalprop.diagnosis.explain import explain

        explanation = explain(record, model)
    if explanation is None:
        return None
    n = explanation.norms
    fig, axes = new_figure(6.4, 3.8)
    ax = axes[0, 0]
    x = np.arange(1, len(explanation.layers) + 1)
    for key, step, color in (("init", explanation.step_init, "C0"),
                             ("end", explanation.step_end, "C3")):
        ax.plot(x, _positive(n[f"measured_{key}"]), "o-", ms=3, lw=1.2, color=color,
                label=f"measured, step {step}")
        ax.plot(x, _positive(n[f"predicted_{key}"]), "--", lw=1.6, color=color, alpha=0.8,
                label=f"mean-field prediction, step {step}")
    ax.set_yscale("log")
    ax.set_xlabel("weight layer (input → output)")
    ax.set_ylabel("||dL/dh|| (log)")
    ax.set_title("Gradient norm per layer: theory vs measurement", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.set_xlim(0.5, len(x) + 0.5)
    ax.legend(fontsize=7, loc="best")
    return fig


def _output_range(d: ActivationDef) -> tuple[float, float, float, float] | None:
    """(min output, max output, saturation edges): |phi'| < SATURATION_DERIVATIVE_RATIO max|phi'|
    beyond the edges (sigmoid: h < 0.0257 or h > 0.9743; tanh: |h| > 0.949)."""
    if d.output_range is None or d.saturation is None or d.saturation.output_threshold is None:
        return None
    center, c = d.saturation.output_threshold(SATURATION_DERIVATIVE_RATIO)
    return (*d.output_range, center - c, center + c)


#: activation -> (min output, max output, saturation edges), from the activation vocabulary.
_OUTPUT_RANGE = {
    n: r for n in ACTIVATIONS if (r := _output_range(ACTIVATIONS.get(n))) is not None
}


@requires("out_p50", title="Activation percentiles")
def activation_percentiles(record: Record, steps: Sequence[int] | None = None) -> Figure | None:
    """Per-layer output percentiles (5-95 and 15-85 bands, median line) at the first and last
    recorded steps, for weight-layer outputs (pre-activations) and activation outputs."""
    mods = record.layer_names(role="module", metric="out_p50")
    acts = [n for n in mods if record.layers[n].activation is not None]
    pre = [n for n in mods if n not in set(acts)
           and any(i.role == "param" and i.module == n and i.shape and len(i.shape) >= 2
                   for i in record.layers.values())]
    groups = [(g, t) for g, t in ((pre, "weight-layer outputs (pre-activations)"),
                                  (acts, "activation outputs")) if g]
    if not groups:
        groups = [(mods, "layer outputs")]
    st = record.matrix("out_p50", mods)[0]
    if st.size == 0:
        return None
    chosen = list(steps) if steps is not None else sorted({int(st[0]), int(st[-1])})
    fig, axes = new_figure(4.2 * len(groups), 2.6 * len(chosen), ncols=len(groups),
                           nrows=len(chosen))
    keys = ["out_p05", "out_p15", "out_p50", "out_p85", "out_p95"]
    for r, s in enumerate(chosen):
        for c, (layers, title) in enumerate(groups):
            ax = axes[r, c]
            vals = {k: np.array([record.get(s, n, k) for n in layers]) for k in keys}
            x = np.arange(1, len(layers) + 1)
            ax.fill_between(x, vals["out_p05"], vals["out_p95"], color="C0", alpha=0.2,
                            label="5-95%")
            ax.fill_between(x, vals["out_p15"], vals["out_p85"], color="C0", alpha=0.4,
                            label="15-85%")
            ax.plot(x, vals["out_p50"], color="C0", lw=1.3, label="median")
            ax.axhline(0, color="k", lw=0.5)
            kinds = {record.layers[n].activation for n in layers}
            if len(kinds) == 1 and next(iter(kinds)) in _OUTPUT_RANGE:
                # show the activation's whole range, tails where |phi'| < 0.1 max shaded
                lo, hi, sat_lo, sat_hi = _OUTPUT_RANGE[next(iter(kinds))]
                ax.set_ylim(lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo))
                ax.axhspan(lo, sat_lo, color="red", alpha=0.15, label="saturated")
                ax.axhspan(sat_hi, hi, color="red", alpha=0.15)
            ax.set_title(f"{title}, step {s}", fontsize=9)
            ax.set_xlabel("layer (input → output)")
            ax.grid(alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=7, loc="best")
    return fig


def _heatmap(record: Record, metric: str, title: str, cbar: str) -> Figure | None:
    layers = record.layer_names(metric=metric)
    st, _, m = record.matrix(metric, layers)
    if st.size == 0 or not layers:
        return None
    fig, axes = new_figure(7.5, min(6.0, 1.8 + 0.07 * len(layers)))
    ax = axes[0, 0]
    im = ax.imshow(m.T, aspect="auto", origin="upper", cmap="magma", vmin=0.0, vmax=1.0,
                   interpolation="nearest",
                   extent=(float(st[0]) - 0.5, float(st[-1]) + 0.5, len(layers) + 0.5, 0.5))
    k = max(1, math.ceil(len(layers) / 20))
    ticks = list(range(1, len(layers) + 1, k))
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{i} ({record.layers[layers[i - 1]].activation})" for i in ticks],
                       fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("activation layer (input at top)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.05)
    return fig


@requires("saturated_frac", title="Saturation (layer x step)")
def saturation_heatmap(record: Record) -> Figure | None:
    """Fraction of saturated units (|phi'(z)| below the threshold) per activation layer and
    step; bright = saturated."""
    return _heatmap(record, "saturated_frac", "Saturated fraction per layer and step",
                    "fraction saturated")


@requires("dead_frac", title="Dead units (layer x step)")
def dead_heatmap(record: Record) -> Figure | None:
    """Fraction of dead rectifier units (inactive for the whole batch) per layer and step."""
    return _heatmap(record, "dead_frac", "Dead-unit fraction per layer and step", "fraction dead")


@requires("update_ratio", title="Update / weight ratio")
def update_ratios(record: Record, n_steps: int = 5) -> Figure | None:
    """||W_after - W_before|| / ||W_before|| per weight matrix at several steps (log scale);
    the dashed line marks the usual ~1e-3."""
    wp = [p for p in weight_params(record) if p in set(record.layer_names(metric="update_ratio"))]
    if not wp:
        return None
    st, _, m = record.matrix("update_ratio", wp)
    if st.size == 0 or not np.isfinite(_positive(m)).any():
        return None
    fig, axes = new_figure(6.0, 3.2)
    ax = axes[0, 0]
    chosen = pick_steps(st.tolist(), n_steps)
    x = np.arange(1, len(wp) + 1)
    for c, s in zip(_step_colors(len(chosen)), chosen, strict=True):
        row = m[np.nonzero(st == s)[0][0]]
        ax.plot(x, _positive(row), "-o", ms=2.5, lw=1.2, color=c, label=f"step {s}")
    ax.axhline(1e-3, color="gray", ls="--", lw=0.8)
    _mark_zeros(ax, x, m)
    ax.set_xlim(0.5, len(wp) + 0.5)
    ax.set_yscale("log")
    ax.set_xlabel("weight matrix (input → output)")
    ax.set_ylabel("||ΔW|| / ||W||")
    ax.set_title("Update / weight ratio per step", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def recurrent_layers(record: Record) -> list[str]:
    """Layers with a per-time-step gradient profile (recurrent layers), forward order."""
    return [n for n, i in record.layers.items() if i.role == "module" and i.time_steps]


@requires("out_grad_norm_t0", title="Gradient through time")
def time_profile(record: Record, steps: Sequence[int] | None = None, n_steps: int = 4) -> (
    Figure | None
):
    """||dL/dh_t|| against the time step t (log scale) for each recurrent layer, at several
    recorded steps. Flat: the gradient reaches the first time step; rising toward the last
    step: it vanishes through time; falling: it explodes."""
    layers = recurrent_layers(record)
    if not layers:
        return None
    layers = layers[:3]
    fig, axes = new_figure(4.2 * len(layers), 3.4, ncols=len(layers))
    for k, name in enumerate(layers):
        ax = axes[0, k]
        have = [s for s in record.steps if record.time_profile(name, s)[0].size]
        chosen = list(steps) if steps is not None else pick_steps(have, n_steps)
        for c, s in zip(_step_colors(len(chosen)), chosen, strict=True):
            t, g = record.time_profile(name, s)
            if t.size:
                ax.plot(t, _positive(g), "-", lw=1.2, color=c, label=f"step {s}")
                zero = np.nonzero(np.asarray(g) == 0)[0]
                if zero.size:
                    ax.plot(t[zero], np.full(zero.size, np.nan), "v", color="C3")
        ax.set_yscale("log")
        ax.set_xlabel("time step t")
        ax.set_ylabel("||dL/dh_t|| (log)")
        ax.set_title(f"{name} ({record.layers[name].type})", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    return fig


def trial_losses(trials: Sequence[dict[str, Any]]) -> Figure | None:
    """Loss curves of doctor trials (each trial dict with ``remedy`` and ``losses``)."""
    rows = [t for t in trials if isinstance(t, dict) and t.get("losses")]
    if not rows:
        return None
    fig, axes = new_figure(7.5, 3.4)
    ax = axes[0, 0]
    positive = True
    for i, t in enumerate(rows):
        y = np.asarray([v if v is not None else np.nan for v in t["losses"]], dtype=np.float64)
        ok = np.isfinite(y)
        positive &= bool((y[ok] > 0).all())
        ax.plot(np.arange(len(y))[ok], y[ok], lw=1.2, color=f"C{i % 10}",
                label=str(t.get("remedy", f"trial {i}")))
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Trials: training loss per remedy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


__all__ = [
    "FIGURES",
    "activation_percentiles",
    "available",
    "can_draw",
    "dead_heatmap",
    "gradient_flow",
    "layer_label",
    "loss_curve",
    "new_figure",
    "pick_steps",
    "requires",
    "recurrent_layers",
    "saturation_heatmap",
    "time_profile",
    "trial_losses",
    "update_ratios",
    "weight_params",
]
