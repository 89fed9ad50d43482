"""Matplotlib helpers for the studies' figures (headless Agg backend, one consistent style)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from signalprop.record import atomic_write_bytes  # noqa: E402

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 9,
    "axes.titlesize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
}

#: Colours for the usual pairs (plain vs normalised, and so on)
PLAIN, NORMED, THIRD, FOURTH = "#d62728", "#1f77b4", "#2ca02c", "#9467bd"


def subplots(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (4.2, 3.2), **kw: Any):
    """``plt.subplots`` with the lab style; ``size`` is per panel (inches)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kw
        )
    for ax in axes.flat:
        for k, v in STYLE.items():
            if k == "axes.grid" and v:
                ax.grid(True, alpha=STYLE["grid.alpha"])
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
    return fig, axes


def save(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as PNG atomically and close it."""
    path = Path(path)
    buf = io.BytesIO()
    with plt.rc_context(STYLE):
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=STYLE["savefig.dpi"])
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def figdir(workdir: str | Path) -> Path:
    """``workdir/figures`` (created)."""
    d = Path(workdir) / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


def heatmap(
    ax: Any,
    values: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    fmt: str = "{:.2f}",
    log: bool = False,
    cbar_label: str = "",
) -> Any:
    """Annotated heat map; NaN cells are grey and marked "n/a" (with ``log``, zeros are grey and
    marked "0")."""
    from matplotlib.colors import LogNorm

    v = np.asarray(values, dtype=float)
    masked = np.ma.masked_invalid(v)
    cm = matplotlib.colormaps[cmap].copy()
    cm = cm.with_extremes(bad="#dddddd")
    norm = None
    if log:
        pos = v[np.isfinite(v) & (v > 0)]
        lo = vmin if vmin is not None else (pos.min() if pos.size else 1e-3)
        hi = vmax if vmax is not None else (pos.max() if pos.size else 1.0)
        norm = LogNorm(vmin=lo, vmax=max(hi, lo * 10))
        masked = np.ma.masked_where(~(np.isfinite(v) & (v > 0)), v)
        im = ax.imshow(masked, cmap=cm, norm=norm, aspect="auto")
    else:
        im = ax.imshow(masked, cmap=cm, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels, rotation=60, ha="right")
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels)
    ax.grid(False)
    lo_c, hi_c = im.get_clim()
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            val = v[i, j]
            if log and val == 0:
                ax.text(j, i, "0", ha="center", va="center", fontsize=6, color="#555555")
                continue
            if not np.isfinite(val):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=6, color="#555555")
                continue
            if log and val > 0:
                rel = (np.log10(val) - np.log10(lo_c)) / max(np.log10(hi_c) - np.log10(lo_c), 1e-9)
            else:
                rel = (val - lo_c) / max(hi_c - lo_c, 1e-12)
            ax.text(
                j, i, fmt.format(val), ha="center", va="center", fontsize=6,
                color="white" if rel < 0.5 else "black",
            )
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if cbar_label:
        cb.set_label(cbar_label)
    return im


def finite(values: Sequence[float]) -> np.ndarray:
    """Values as a float array with non-finite entries set to NaN (so plots leave gaps)."""
    a = np.asarray(values, dtype=float)
    a[~np.isfinite(a)] = np.nan
    return a


def plain_ticks(ax: Any, axis: str = "x") -> None:
    """Label a log axis with plain numbers (4, 8, 16 rather than 2^2, 2^3, 2^4)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def nice_log_ticks(ax: Any, axis: str = "y") -> None:
    """On a log axis spanning less than ~3 decades, tick at 1, 2, 5 x 10^k with plain labels
    (matplotlib would otherwise label crowded minor ticks like "6 x 10^-1")."""
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if not (lo > 0 and hi > lo) or np.log10(hi / lo) > 3:
        return
    ticks = [m * 10.0**k for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
             for m in (1, 2, 5) if lo <= m * 10.0**k <= hi]
    if len(ticks) < 2:
        return
    (ax.set_yticks if axis == "y" else ax.set_xticks)(ticks)
    plain_ticks(ax, axis)


def mean_band(
    ax: Any,
    x: Sequence[float],
    runs: Sequence[Sequence[float]],
    *,
    color: str,
    label: str | None = None,
    **kw: Any,
) -> None:
    """Plot the mean over seeds of ``runs`` (one row per seed, aligned on ``x``) with its 95% t
    interval as a shaded band (non-finite entries are ignored per point)."""
    from signalprop.lab.evidence import mean_effect

    xs = np.asarray(x, dtype=float)
    n = min(len(r) for r in runs) if runs else 0
    if n == 0:
        return
    cols = [[float(r[i]) for r in runs] for i in range(min(n, xs.size))]
    effs = [mean_effect(c) for c in cols]
    m = np.array([e.estimate for e in effs])
    lo = np.array([e.lo if np.isfinite(e.lo) else e.estimate for e in effs])
    hi = np.array([e.hi if np.isfinite(e.hi) else e.estimate for e in effs])
    xs = xs[: m.size]
    lab = f"{label} (mean, 95% CI, n={len(runs)})" if label else None
    ax.plot(xs, m, color=color, label=lab, **kw)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)


def errorbars(ax: Any, x: Sequence[float], effects: Sequence[Any], *, color: str,
              label: str | None = None, **kw: Any) -> None:
    """Points with 95% interval bars from :class:`signalprop.lab.evidence.Effect` objects."""
    m = np.array([e.estimate for e in effects], dtype=float)
    lo = np.array([e.lo if np.isfinite(e.lo) else e.estimate for e in effects], dtype=float)
    hi = np.array([e.hi if np.isfinite(e.hi) else e.estimate for e in effects], dtype=float)
    ax.errorbar(np.asarray(x, dtype=float), m, yerr=[np.clip(m - lo, 0, None), np.clip(hi - m, 0, None)], color=color, label=label,
                capsize=3, marker="o", ms=4, **kw)


def panel(size: tuple[float, float] = (5.2, 3.6)) -> tuple[Any, Any]:
    """One-panel figure: ``(fig, ax)``."""
    fig, axes = subplots(1, 1, size=size)
    return fig, axes[0, 0]


def finish(
    ax: Any,
    xlabel: str,
    ylabel: str,
    title: str,
    *,
    xscale: str | None = None,
    yscale: str | None = None,
    legend: str | None = "best",
    **legend_kw: Any,
) -> None:
    """Label a panel: axis scales (``"log"``, ``"log2"`` with plain tick labels), labels, title
    and legend (``legend=None``: none)."""
    for axis, scale in (("x", xscale), ("y", yscale)):
        if scale is None:
            continue
        setter = ax.set_xscale if axis == "x" else ax.set_yscale
        if scale == "log2":
            setter("log", base=2)
            plain_ticks(ax, axis)
        else:
            setter(scale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend is not None:
        ax.legend(loc=legend, **legend_kw)
