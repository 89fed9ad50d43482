"""Does batch norm make initialisation easier?

An init-scale sweep (weights N(0, 1/fan_in) times a scale from 0.25 to 8) x {plain, BN} of a sigmoid
MLP trained with SGD from several seeds: final loss and its spread across seeds, how often
differently seeded networks agree in their test predictions, and the gradient norm at
initialisation vs the scale. Plus Santurkar, Tsipras, Ilyas & Madry (2018)'s landscape
measurements during training, with and without BN: from the current point, step along the
gradient with a range of step sizes and record the range of the loss ("loss landscape
variation"), the largest l2 change of the gradient ("gradient predictiveness"), and the largest
gradient change per unit distance moved ("effective beta-smoothness").
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from signalprop import stats
from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import nets
from signalprop.lab import plotting as P
from signalprop.record import MODEL

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 3
NAME = "initialisation"
TITLE = "Batch norm and the initial weight scale"
QUESTION = "Does batch norm make initialisation easier (less sensitive to the initial scale)?"
CLAIM = (
    "With batch norm, training is much less sensitive to the initial weight scale: the final "
    "loss varies less across scales and seeds, differently seeded networks agree more, and the "
    "loss landscape is smoother (smaller loss variation, more predictive gradients, smaller "
    "effective beta-smoothness; Santurkar et al. 2018)."
)
SETUP = (
    "Sigmoid MLP on scikit-learn digits, weights N(0, s^2/fan_in) for s from 0.25 to 8 (all "
    "layers), zero biases, plain SGD with batch 64, with and without BatchNorm1d before every "
    "sigmoid, several seeds per cell. Agreement: fraction of test examples on which two "
    "differently seeded networks of the same cell predict the same class, averaged over pairs. "
    "Landscape (a ReLU MLP of the same shape with He init, as Santurkar et al. used ReLU "
    "networks, so that both variants train), at two depths (6 and 16: the answer depends on the "
    "regime) and 3 seeds each: every few steps, from the current weights w and mini-batch "
    "gradient g, the loss and gradient at w - eta g on the same batch for eta in lr x [0.25 .. 4] "
    "(BN in training mode, running statistics untouched). The loss variation is also divided by "
    "the loss at w (relative variation), because a network that fits faster has a smaller loss "
    "and so a smaller absolute variation; the verdict uses the relative one. Intervals: Welch on "
    "per-seed values (ranges across scales, landscape medians on the logs); spread and agreement "
    "are per scale, so their intervals run over the scales. 3 seeds quick, 5 full."
)
REFERENCES = [
    "Ioffe & Szegedy 2015, Batch Normalization",
    "Santurkar, Tsipras, Ilyas & Madry 2018, How Does Batch Normalization Help Optimization?",
]
CAPTIONS = {
    "init_final_loss": "Final training loss vs initial weight scale (mean over seeds; bars: "
    "min-max over seeds), with and without batch norm.",
    "init_agreement": "Left: fraction of test predictions on which differently seeded networks "
    "agree, vs initial weight scale. Right: gradient norm at initialisation vs scale (log-log).",
    "init_landscape": "Santurkar et al. (2018) measurements along the gradient direction during "
    "training, one row per depth: relative loss range, gradient change (predictiveness) and "
    "effective beta-smoothness (log10, mean over seeds with 95% intervals).",
}

MARGIN = 0.10


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {"depth": 3, "width": 32, "steps": 40, "scales": [0.5, 4.0],
                         "seeds": [0, 1, 2], "landscape_steps": 30, "landscape_every": 10,
                         "landscape_depths": [3], "landscape_seeds": [0, 1]}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "data": "digits",
        "depth": 6,
        "width": 64,
        "steps": 300 if quick else 1500,
        "batch_size": 64,
        "lr": 0.5,
        "scales": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
        "seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
        "landscape_steps": 200 if quick else 1500,
        "landscape_every": 20 if quick else 50,
        "landscape_depths": [6, 16],
        "landscape_seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
        "landscape_etas": [0.25, 0.5, 1.0, 2.0, 4.0],
        # Santurkar et al. used ReLU networks (VGG): a ReLU MLP (He init) trains with and without
        # BN, so the comparison is between two networks that both learn
        "landscape_activation": "relu",
        "landscape_init": "kaiming",
        "landscape_lr": 0.1,
        "device": "cpu",
    }


def _one(config: dict[str, Any], variant: str, scale: float, seed: int) -> dict[str, Any]:
    data = nets.dataset(config["data"], config["device"])
    model = nets.mlp(data, config["width"], config["depth"], "sigmoid",
                     "batch" if variant == "bn" else "none", nonlinearity="linear", scale=scale,
                     seed=seed)
    # the probe records step 0 only: the gradient norm and first/last ratio at initialisation
    r, _, accs = nets.train(model, data, steps=config["steps"], lr=config["lr"],
                            batch_size=config["batch_size"], seed=seed,
                            probe={"forward": False, "backward": False}, schedule=[0])
    return {
        "variant": variant, "scale": scale, "seed": seed,
        "final_train_loss": r.final_loss, "final_test_acc": accs[-1],
        "diverged": r.diverged, "grad_norm_init": r.record.get(0, MODEL, "grad_norm_total"),
        "grad_ratio_init": stats.grad_ratio(r.record, 0),
        "pred": nets.predict(model, data.x_test).tolist() if not r.diverged else None,
    }


def landscape_probe(
    model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, etas: list[float]
) -> dict[str, float]:
    """Santurkar et al. (2018) measurements at the current weights on one batch.

    With g = grad L(w) and w_eta = w - eta g for each eta:
    ``loss_range`` = max_eta L(w_eta) - min_eta L(w_eta) (including eta = 0);
    ``grad_change`` = max_eta ||grad L(w_eta) - g|| ("gradient predictiveness": small = predictive);
    ``beta`` = max_eta ||grad L(w_eta) - g|| / ||eta g|| ("effective beta-smoothness").
    The weights are restored afterwards.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with nets.batch_stats_only(model):
        model.zero_grad(set_to_none=True)
        loss0 = F.cross_entropy(model(xb), yb)
        g0 = torch.autograd.grad(loss0, params)
        gnorm = torch.sqrt(sum((g * g).sum() for g in g0))
        w0 = [p.detach().clone() for p in params]
        losses, changes, betas = [float(loss0.detach())], [], []
        for eta in etas:
            with torch.no_grad():
                for p, w, g in zip(params, w0, g0, strict=True):
                    p.copy_(w - eta * g)
            loss = F.cross_entropy(model(xb), yb)
            g1 = torch.autograd.grad(loss, params)
            diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g1, g0, strict=True)))
            losses.append(float(loss.detach()))
            changes.append(float(diff))
            betas.append(float(diff / (eta * gnorm).clamp_min(1e-30)))
        with torch.no_grad():
            for p, w in zip(params, w0, strict=True):
                p.copy_(w)
    finite = [v for v in losses if math.isfinite(v)]
    return {
        "loss_range": (max(finite) - min(finite)) if finite else math.nan,
        "loss_range_rel": ((max(finite) - min(finite)) / max(losses[0], 1e-12))
        if finite and math.isfinite(losses[0]) else math.nan,
        "grad_change": max(changes) if changes else math.nan,
        "beta": max(betas) if betas else math.nan,
        "grad_norm": float(gnorm),
    }


def _landscape(config: dict[str, Any], variant: str, depth: int | None = None,
               seed: int = 0) -> dict[str, Any]:
    data = nets.dataset(config["data"], config["device"])
    depth = int(config["depth"] if depth is None else depth)
    act = config["landscape_activation"]
    model = nets.mlp(data, config["width"], depth, act, "batch" if variant == "bn" else "none",
                     init=config["landscape_init"], nonlinearity="relu", seed=seed)
    lr, every = config["landscape_lr"], config["landscape_every"]
    etas = [lr * e for e in config["landscape_etas"]]
    gen = torch.Generator().manual_seed(123 + seed)
    n = data.x_train.shape[0]
    rows = []

    def on_record(step: int) -> None:
        idx = torch.randperm(n, generator=gen)[: config["batch_size"]].to(data.x_train.device)
        rows.append(landscape_probe(model, data.x_train[idx], data.y_train[idx], etas))

    r, steps, _ = nets.train(model, data, steps=config["landscape_steps"], lr=lr,
                             batch_size=config["batch_size"], seed=seed, every=every,
                             on_record=on_record)
    out: dict[str, Any] = {"steps": steps, "variant": variant, "diverged": r.diverged,
                           "depth": depth, "seed": seed, "activation": act,
                           "loss_steps": list(range(0, r.steps, every)),
                           "losses": r.losses[::every]}
    for k in ("loss_range", "loss_range_rel", "grad_change", "beta", "grad_norm"):
        out[k] = [row[k] for row in rows]
    return out


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    base = {k: v for k, v in config.items()
            if k not in ("scales", "seeds", "executor") and not k.startswith("landscape")}
    runs = [B.Cell({**base, "variant": v, "scale": sc, "seed": s}, _one, (config, v, sc, s),
                   tag="run")
            for v in ("plain", "bn") for sc in config["scales"] for s in config["seeds"]]
    lkey = {k: v for k, v in config.items()
            if k not in ("scales", "seeds", "executor", "steps", "lr", "landscape_depths",
                         "landscape_seeds")}
    land = [B.Cell({**lkey, "variant": v, "ldepth": d, "lseed": sd}, _landscape,
                   (config, v, d, sd), tag="land")
            for d in config.get("landscape_depths", [config["depth"]])
            for v in ("plain", "bn") for sd in config.get("landscape_seeds", [0])]
    done = B.cached_cells(workdir, runs + land, workers=config.get("workers", 1))
    runs, land = done[: len(runs)], done[len(runs):]
    return {"runs": runs, "landscape": land, "scales": list(config["scales"])}


# --- summaries ---------------------------------------------------------------------------------
def agreement(preds: list[list[int] | None]) -> float:
    """Mean over pairs of seeds of the fraction of test examples with the same predicted class
    (a diverged network, with no predictions, agrees with nothing)."""
    if len(preds) < 2:
        return math.nan
    vals = []
    for a, b in itertools.combinations(preds, 2):
        if a is None or b is None:
            vals.append(0.0)
        else:
            vals.append(float(np.mean(np.asarray(a) == np.asarray(b))))
    return float(np.mean(vals))


def summarise(runs: list[dict[str, Any]], scales: list[float]) -> dict[str, dict[str, list]]:
    """Per variant, per scale: mean/min/max final loss, std over seeds, agreement, grad norm."""
    out: dict[str, dict[str, list]] = {}
    for variant in ("plain", "bn"):
        d: dict[str, list] = {k: [] for k in ("mean", "lo", "hi", "std", "agree", "gnorm",
                                               "acc", "diverged")}
        for sc in scales:
            rs = [r for r in runs if r["variant"] == variant and r["scale"] == sc]
            # a diverged run counts at the chance-level loss so it cannot look good
            losses = np.asarray([r["final_train_loss"] if not r["diverged"] else math.log(10)
                                 for r in rs], dtype=float)
            losses = np.where(np.isfinite(losses), losses, math.log(10))
            d["mean"].append(float(losses.mean()) if losses.size else math.nan)
            d["lo"].append(float(losses.min()) if losses.size else math.nan)
            d["hi"].append(float(losses.max()) if losses.size else math.nan)
            d["std"].append(float(losses.std()) if losses.size else math.nan)
            d["agree"].append(agreement([r["pred"] for r in rs]))
            d["gnorm"].append(float(np.nanmean([r["grad_norm_init"] for r in rs])))
            d["acc"].append(float(np.nanmean([r["final_test_acc"] for r in rs])))
            d["diverged"].append(int(sum(bool(r["diverged"]) for r in rs)))
        out[variant] = d
    return out


def _seed_ranges(runs: list[dict[str, Any]], variant: str) -> list[float]:
    """Per seed: max - min over the scales of the final loss (diverged = chance)."""
    out = []
    for sd in sorted({r["seed"] for r in runs}):
        ls = [math.log(10) if r["diverged"] or not math.isfinite(r["final_train_loss"])
              else r["final_train_loss"] for r in runs if r["variant"] == variant
              and r["seed"] == sd]
        if ls:
            out.append(max(ls) - min(ls))
    return out


def landscape_runs(land: Any) -> list[dict[str, Any]]:
    """The landscape runs as a list (older results stored one run per variant in a dict)."""
    if isinstance(land, dict):
        return [dict(v, variant=k) for k, v in land.items()]
    return list(land)


LANDSCAPE = (("loss_range_rel", "relative loss variation along the gradient"),
             ("grad_change", "gradient change (predictiveness)"),
             ("beta", "effective beta-smoothness"))


def _land_medians(runs: list[dict[str, Any]], variant: str, key: str, dep: int) -> list[float]:
    """Per seed: the median of a landscape measure over training."""
    return [float(np.nanmedian(np.asarray(r.get(key) or r.get("loss_range") or [math.nan],
                                          dtype=float)))
            for r in runs if r["variant"] == variant and r.get("depth", 0) == dep]


def _log_ratio_change(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> float:
    """(geomean a / geomean b) / (geomean c / geomean d): how a BN/plain ratio moves between two
    regimes (1: it does not)."""
    lg = [float(np.mean(np.log(x[x > 0]))) if np.any(x > 0) else math.nan for x in (a, b, c, d)]
    return math.exp(lg[0] - lg[1] - lg[2] + lg[3])


def measure(data: dict[str, Any]) -> dict[str, Any]:
    """The numbers: sensitivity to the init scale (per-seed range across scales, seed spread and
    prediction agreement per scale, BN - plain) and Santurkar et al.'s landscape measures per
    depth (BN / plain per seed, on the logs), with how each ratio moves from the shallowest to
    the deepest network (percentile bootstrap)."""
    s = summarise(data["runs"], data["scales"])
    p, b = s["plain"], s["bn"]
    m: dict[str, Any] = {
        "summary": s,
        "range": E.diff_effect(_seed_ranges(data["runs"], "bn"),
                               _seed_ranges(data["runs"], "plain"),
                               "loss range across scales BN - plain"),
        "spread": E.mean_effect([x - y for x, y in zip(b["std"], p["std"], strict=True)],
                                "seed spread (std) BN - plain, over scales"),
        "agree": E.mean_effect([x - y for x, y in zip(b["agree"], p["agree"], strict=True)],
                               "prediction agreement BN - plain, over scales"),
    }
    runs = landscape_runs(data["landscape"])
    depths = sorted({r.get("depth", 0) for r in runs})
    m["depths"] = depths
    m["landscape"] = {dep: {key: E.log_ratio_effect(_land_medians(runs, "bn", key, dep),
                                                    _land_medians(runs, "plain", key, dep),
                                                    f"depth {dep}: {key} BN / plain")
                            for key, _ in LANDSCAPE} for dep in depths}
    m["level"] = {dep: {v: [float(np.nanmedian([x for x in r.get("losses", [])
                                                 if math.isfinite(x)] or [math.nan]))
                            for r in runs if r["variant"] == v and r.get("depth", 0) == dep]
                        for v in ("plain", "bn")} for dep in depths}
    if len(depths) >= 2:
        lo, hi = depths[0], depths[-1]
        m["regime"] = {key: E.bootstrap_effect(
            [_land_medians(runs, "bn", key, hi), _land_medians(runs, "plain", key, hi),
             _land_medians(runs, "bn", key, lo), _land_medians(runs, "plain", key, lo)],
            _log_ratio_change, f"{key}: BN/plain at depth {hi} over BN/plain at depth {lo}",
            null=1.0) for key, _ in LANDSCAPE}
    return m


def _say_scales(m: dict[str, Any], scales: list[float],
                nums: dict[str, Any]) -> tuple[list[str], list[str]]:
    p, b = m["summary"]["plain"], m["summary"]["bn"]
    e1, e2, e3 = m["range"], m["spread"], m["agree"]
    v1, v2, v3 = E.verdict(e1, -1), E.verdict(e2, -1), E.verdict(e3, +1)
    rng_p = float(np.nanmax(p["mean"]) - np.nanmin(p["mean"]))
    rng_b = float(np.nanmax(b["mean"]) - np.nanmin(b["mean"]))
    ag_p, ag_b = float(np.nanmean(p["agree"])), float(np.nanmean(b["agree"]))
    nums.update({"final loss range over scales, plain": rng_p,
                 "final loss range over scales, BN": rng_b,
                 "prediction agreement between seeds, plain": ag_p,
                 "prediction agreement between seeds, BN": ag_b})
    for e in (e1, e2, e3):
        nums.update(E.numbers(e))
    details = [
        f"Final training loss across init scales {B.fmt(min(scales))}..{B.fmt(max(scales))}: "
        f"ranges over {B.fmt(rng_b)} with BN vs {B.fmt(rng_p)} without; per seed, "
        f"{E.describe(e1, v1)}" + (" (BN is NOT less sensitive)." if v1 == B.CONTRADICTS
                                  else "."),
        f"Spread across seeds (std of the final loss): {B.fmt(float(np.nanmean(b['std'])))} "
        f"with BN vs {B.fmt(float(np.nanmean(p['std'])))} without; {E.describe(e2, v2)}"
        + (" (BN does NOT reduce it)." if v2 == B.CONTRADICTS else "."),
        f"Differently seeded networks agree on {B.pct(ag_b)} of test predictions with BN vs "
        f"{B.pct(ag_p)} without; {E.describe(e3, v3, B.pct)}"
        + (" (BN networks agree LESS)." if v3 == B.CONTRADICTS else "."),
    ]
    gp, gb = np.asarray(p["gnorm"], dtype=float), np.asarray(b["gnorm"], dtype=float)
    if np.all(gp > 0) and np.all(gb > 0):
        nums["gradient norm at init, max/min over scales, plain"] = float(gp.max() / gp.min())
        nums["gradient norm at init, max/min over scales, BN"] = float(gb.max() / gb.min())
        details.append(
            f"Gradient norm at initialisation (probe record) varies by a factor "
            f"{B.fmt(gp.max() / gp.min())} over the scales without BN and "
            f"{B.fmt(gb.max() / gb.min())} with BN (BN's hidden layers are scale-invariant: "
            "their gradients scale as 1/s).")
    return details, [v1, v2, v3]


def _say_landscape(m: dict[str, Any], nums: dict[str, Any]) -> tuple[list[str], str | None]:
    details, by_depth = [], []
    for dep in m["depths"]:
        vs = []
        for key, lab in LANDSCAPE:
            e = m["landscape"][dep][key]
            v = E.verdict(e, -1)
            nums.update(E.numbers(e))
            vs.append(v)
            details.append(f"Landscape, depth {dep}, median {lab}: {E.describe(e, v)}"
                           + (" (BN is NOT smoother here)." if v == B.CONTRADICTS else "."))
        for v in ("plain", "bn"):
            lv = m["level"][dep][v]
            nums[f"landscape depth {dep}: median training loss, {'BN' if v == 'bn' else v}"] = \
                float(np.nanmean(lv)) if lv else math.nan
        by_depth.append(B.combine_verdicts(vs))
    if not by_depth:
        return details, None
    if len(set(by_depth)) == 1 and by_depth[0] != B.INCONCLUSIVE:
        return details, by_depth[0]
    if B.SUPPORTS in by_depth or B.CONTRADICTS in by_depth:
        regime = [m["regime"][k] for k, _ in LANDSCAPE] if "regime" in m else []
        for e in regime:
            nums.update(E.numbers(e))
        details.append(
            "The landscape answer depends on the regime: "
            + ", ".join(f"depth {d}: {v}" for d, v in zip(m["depths"], by_depth, strict=True))
            + (" (" + "; ".join(E.describe(e, E.verdict(e, +1)) for e in regime) + ")"
               if regime else "") + ".")
    return details, B.INCONCLUSIVE


def conclude(data: dict[str, Any]) -> B.Conclusion:
    m = measure(data)
    nums: dict[str, Any] = {}
    details, verdicts = _say_scales(m, data["scales"], nums)
    land, v_land = _say_landscape(m, nums)
    details += land
    if v_land is not None:
        verdicts.append(v_land)
    sentence = " ".join(d for d in details if not d.startswith("Gradient norm"))
    return B.conclusion(CLAIM, sentence, B.combine_verdicts(verdicts), nums, details)


_LABELS = {"plain": ("sigmoid", P.PLAIN), "bn": ("BN + sigmoid", P.NORMED)}


def _fig_loss(s: dict[str, Any], scales: list[float], path: Path) -> Path:
    fig, ax = P.panel((5.0, 3.5))
    for v, (lab, c) in _LABELS.items():
        m = np.asarray(s[v]["mean"])
        ax.errorbar(scales, m, yerr=[m - np.asarray(s[v]["lo"]), np.asarray(s[v]["hi"]) - m],
                    fmt="o-", color=c, capsize=3, label=lab)
    ax.axhline(math.log(10), color="#555555", ls=":", lw=1, label="chance ln(10)")
    P.finish(ax, "initial weight scale s (std = s / sqrt(fan_in))", "final training loss",
             "Sensitivity to the initial scale", xscale="log2", yscale="log")
    return P.save(fig, path)


def _fig_agreement(s: dict[str, Any], scales: list[float], path: Path) -> Path:
    fig, axes = P.subplots(1, 2, size=(4.4, 3.4))
    for v, (lab, c) in _LABELS.items():
        axes[0, 0].plot(scales, s[v]["agree"], "o-", color=c, label=lab)
        axes[0, 1].plot(scales, s[v]["gnorm"], "o-", color=c, label=lab)
    axes[0, 0].set_ylim(0, 1.02)
    P.finish(axes[0, 0], "initial weight scale s", "agreement of test predictions between seeds",
             "Do seeds agree?", xscale="log2")
    P.finish(axes[0, 1], "initial weight scale s", "gradient norm at initialisation",
             "Gradient at initialisation", xscale="log2", yscale="log")
    P.nice_log_ticks(axes[0, 1], "y")
    return P.save(fig, path)


def _fig_landscape(runs: list[dict[str, Any]], path: Path) -> Path:
    act = runs[0].get("activation", "relu") if runs else "relu"
    depths = sorted({r.get("depth", 0) for r in runs})
    fig, axes = P.subplots(max(1, len(depths)), 3, size=(3.7, 3.0))
    for row, dep in enumerate(depths):
        for ax, key, lab in ((axes[row, 0], "loss_range_rel", "relative loss range"),
                             (axes[row, 1], "grad_change", "max ||g(w - eta g) - g||"),
                             (axes[row, 2], "beta", "effective beta-smoothness")):
            for v, name, c in (("plain", act, P.PLAIN), ("bn", f"BN + {act}", P.NORMED)):
                rs = [r for r in runs if r["variant"] == v and r.get("depth", 0) == dep
                      and r.get(key)]
                if rs:
                    n = min(len(r[key]) for r in rs)
                    P.mean_band(ax, rs[0]["steps"][:n],
                                [np.log10(np.maximum(np.asarray(r[key][:n], float), 1e-12))
                                 for r in rs], color=c, label=name, lw=1)
            P.finish(ax, "training step", f"log10 {lab}", f"depth {dep}", fontsize=6)
    return P.save(fig, path)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    s = summarise(data["runs"], data["scales"])
    return [_fig_loss(s, data["scales"], d / "init_final_loss.png"),
            _fig_agreement(s, data["scales"], d / "init_agreement.png"),
            _fig_landscape(landscape_runs(data["landscape"]), d / "init_landscape.png")]
