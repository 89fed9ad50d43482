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

import contextlib
import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import plotting as P
from signalprop.lab.common import (
    MLP,
    get_data,
    init_linears_,
    predictions,
    seeded,
    train_classifier,
)

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 2
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
        "landscape_init": "he",
        "landscape_lr": 0.1,
        "device": "cpu",
    }


def _one(config: dict[str, Any], variant: str, scale: float, seed: int) -> dict[str, Any]:
    data = get_data(config["data"], config["device"])
    g = seeded(seed)
    model = MLP(data.in_features, data.num_classes, config["width"], config["depth"],
                activation="sigmoid", norm="bn" if variant == "bn" else "none")
    init_linears_(model.linears(), "gaussian", scale, generator=g)
    model.to(config["device"])
    r = train_classifier(model, data, steps=config["steps"], batch_size=config["batch_size"],
                         optimizer="sgd", lr=config["lr"], seed=seed, log_every=10)
    return {
        "variant": variant, "scale": scale, "seed": seed,
        "final_train_loss": r.final_train_loss, "final_test_acc": r.final_test_acc,
        "diverged": r.diverged, "grad_norm_init": r.grad_norm_init,
        "grad_ratio_init": r.grad_ratio_init,
        "pred": predictions(model, data.x_test) if not r.diverged else None,
    }


@contextlib.contextmanager
def _frozen_bn(model: nn.Module) -> Iterator[None]:
    """Batch statistics in the forward pass, running statistics untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom


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
    with _frozen_bn(model):
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
    data = get_data(config["data"], config["device"])
    g = seeded(seed)
    depth = int(config["depth"] if depth is None else depth)
    model = MLP(data.in_features, data.num_classes, config["width"], depth,
                activation=config["landscape_activation"],
                norm="bn" if variant == "bn" else "none")
    init_linears_(model.linears(), config["landscape_init"], 1.0, generator=g)
    model.to(config["device"])
    lr = config["landscape_lr"]
    etas = [lr * e for e in config["landscape_etas"]]
    gen = torch.Generator().manual_seed(123 + seed)
    n = data.x_train.shape[0]
    steps, rows = [], []

    def cb(step: int, m: nn.Module, loss: float, res: Any) -> None:
        if step % config["landscape_every"] == 0:
            idx = torch.randperm(n, generator=gen)[: config["batch_size"]].to(data.x_train.device)
            rows.append(landscape_probe(model, data.x_train[idx], data.y_train[idx], etas))
            steps.append(step)

    r = train_classifier(model, data, steps=config["landscape_steps"],
                         batch_size=config["batch_size"], optimizer="sgd", lr=lr,
                         seed=seed, callback=cb, log_every=config["landscape_every"])
    out: dict[str, Any] = {"steps": steps, "variant": variant, "diverged": r.diverged,
                           "depth": depth, "seed": seed,
                           "activation": config["landscape_activation"],
                           "loss_steps": r.loss_steps, "losses": r.losses}
    for k in ("loss_range", "loss_range_rel", "grad_change", "beta", "grad_norm"):
        out[k] = [row[k] for row in rows]
    return out


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    base = {k: v for k, v in config.items()
            if k not in ("scales", "seeds", "executor") and not k.startswith("landscape")}
    runs = []
    for variant in ("plain", "bn"):
        for sc in config["scales"]:
            for s in config["seeds"]:
                key = {**base, "variant": variant, "scale": sc, "seed": s}
                runs.append(B.cached(workdir, key, lambda v=variant, sc=sc, s=s: _one(
                    config, v, sc, s), tag="run"))
    lkey = {k: v for k, v in config.items()
            if k not in ("scales", "seeds", "executor", "steps", "lr", "landscape_depths",
                         "landscape_seeds")}
    land = [B.cached(workdir, {**lkey, "variant": v, "ldepth": d, "lseed": sd},
                   lambda v=v, d=d, sd=sd: _landscape(config, v, d, sd), tag="land")
            for d in config.get("landscape_depths", [config["depth"]])
            for v in ("plain", "bn") for sd in config.get("landscape_seeds", [0])]
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


def conclude(data: dict[str, Any]) -> B.Conclusion:
    scales = data["scales"]
    s = summarise(data["runs"], scales)
    p, b = s["plain"], s["bn"]
    nums: dict[str, Any] = {}
    details: list[str] = []
    verdicts: list[str] = []
    rng_p = float(np.nanmax(p["mean"]) - np.nanmin(p["mean"]))
    rng_b = float(np.nanmax(b["mean"]) - np.nanmin(b["mean"]))
    nums["final loss range over scales, plain"] = rng_p
    nums["final loss range over scales, BN"] = rng_b
    e1 = E.diff_effect(_seed_ranges(data["runs"], "bn"), _seed_ranges(data["runs"], "plain"),
                       "loss range across scales BN - plain")
    v1 = E.verdict(e1, -1)
    details.append(
        f"Final training loss across init scales {B.fmt(min(scales))}..{B.fmt(max(scales))}: ranges "
        f"over {B.fmt(rng_b)} with BN vs {B.fmt(rng_p)} without; per seed, {E.describe(e1, v1)}"
        + (" (BN is NOT less sensitive)." if v1 == B.CONTRADICTS else ".")
    )
    e2 = E.mean_effect([x - y for x, y in zip(b["std"], p["std"], strict=True)],
                       "seed spread (std) BN - plain, over scales")
    v2 = E.verdict(e2, -1)
    details.append(
        f"Spread across seeds (std of the final loss): {B.fmt(float(np.nanmean(b['std'])))} with BN "
        f"vs {B.fmt(float(np.nanmean(p['std'])))} without; {E.describe(e2, v2)}"
        + (" (BN does NOT reduce it)." if v2 == B.CONTRADICTS else "."))
    ag_p, ag_b = float(np.nanmean(p["agree"])), float(np.nanmean(b["agree"]))
    nums["prediction agreement between seeds, plain"] = ag_p
    nums["prediction agreement between seeds, BN"] = ag_b
    e3 = E.mean_effect([x - y for x, y in zip(b["agree"], p["agree"], strict=True)],
                       "prediction agreement BN - plain, over scales")
    v3 = E.verdict(e3, +1)
    details.append(
        f"Differently seeded networks agree on {B.pct(ag_b)} of test predictions with BN vs "
        f"{B.pct(ag_p)} without; {E.describe(e3, v3, B.pct)}"
        + (" (BN networks agree LESS)." if v3 == B.CONTRADICTS else ".")
    )
    for e in (e1, e2, e3):
        nums.update(E.numbers(e))
    gp, gb = np.asarray(p["gnorm"]), np.asarray(b["gnorm"])
    if np.all(gp > 0) and np.all(gb > 0):
        nums["gradient norm at init, max/min over scales, plain"] = float(gp.max() / gp.min())
        nums["gradient norm at init, max/min over scales, BN"] = float(gb.max() / gb.min())
        details.append(
            f"Gradient norm at initialisation varies by a factor {B.fmt(gp.max() / gp.min())} over "
            f"the scales without BN and {B.fmt(gb.max() / gb.min())} with BN (BN's hidden layers "
            "are scale-invariant: their gradients scale as 1/s)."
        )
    verdicts += [v1, v2, v3]
    # landscape, per depth (the regime), per seed: median over training
    runs = landscape_runs(data["landscape"])
    depths = sorted({r.get("depth", 0) for r in runs})
    by_depth = []
    for dep in depths:
        vs = []
        for key, lab in LANDSCAPE:
            def med(variant: str, key: str = key, dep: int = dep) -> list[float]:
                return [float(np.nanmedian(np.asarray(r.get(key) or r.get("loss_range") or
                                                      [math.nan], dtype=float)))
                        for r in runs if r["variant"] == variant and r.get("depth", 0) == dep]
            e = E.log_ratio_effect(med("bn"), med("plain"), f"depth {dep}: {key} BN / plain")
            v = E.verdict(e, -1)
            nums.update(E.numbers(e))
            vs.append(v)
            details.append(f"Landscape, depth {dep}, median {lab}: "
                           f"{E.describe(e, v)}" + (" (BN is NOT smoother here)."
                                                   if v == B.CONTRADICTS else "."))
        lvl = {v: [float(np.nanmedian([x for x in r.get("losses", []) if math.isfinite(x)]
                                      or [math.nan]))
                   for r in runs if r["variant"] == v and r.get("depth", 0) == dep]
               for v in ("plain", "bn")}
        nums[f"landscape depth {dep}: median training loss, plain"] = float(np.nanmean(
            lvl["plain"])) if lvl["plain"] else math.nan
        nums[f"landscape depth {dep}: median training loss, BN"] = float(np.nanmean(
            lvl["bn"])) if lvl["bn"] else math.nan
        by_depth.append(B.combine_verdicts(vs))
    if by_depth:
        if all(v == B.SUPPORTS for v in by_depth):
            v_land = B.SUPPORTS
        elif all(v == B.CONTRADICTS for v in by_depth):
            v_land = B.CONTRADICTS
        else:
            v_land = B.INCONCLUSIVE
            if B.SUPPORTS in by_depth or B.CONTRADICTS in by_depth:
                details.append("The landscape answer depends on the regime: "
                               + ", ".join(f"depth {d}: {v}" for d, v in
                                           zip(depths, by_depth, strict=True)) + ".")
        verdicts.append(v_land)
    verdict = B.combine_verdicts(verdicts)
    sentence = " ".join(d for d in details if not d.startswith("Gradient norm"))
    return B.conclusion(CLAIM, sentence, verdict, nums, details)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    scales = data["scales"]
    s = summarise(data["runs"], scales)
    out = []
    labels = {"plain": ("sigmoid", P.PLAIN), "bn": ("BN + sigmoid", P.NORMED)}
    fig, axes = P.subplots(1, 1, size=(5.0, 3.5))
    ax = axes[0, 0]
    for v, (lab, c) in labels.items():
        m = np.asarray(s[v]["mean"])
        ax.errorbar(scales, m, yerr=[m - np.asarray(s[v]["lo"]), np.asarray(s[v]["hi"]) - m],
                    fmt="o-", color=c, capsize=3, label=lab)
    ax.axhline(math.log(10), color="#555555", ls=":", lw=1, label="chance ln(10)")
    ax.set_xscale("log", base=2)
    P.plain_ticks(ax)
    ax.set_yscale("log")
    ax.set_xlabel("initial weight scale s (std = s / sqrt(fan_in))")
    ax.set_ylabel("final training loss")
    ax.set_title("Sensitivity to the initial scale")
    ax.legend(loc="best")
    out.append(P.save(fig, d / "init_final_loss.png"))
    fig, axes = P.subplots(1, 2, size=(4.4, 3.4))
    for v, (lab, c) in labels.items():
        axes[0, 0].plot(scales, s[v]["agree"], "o-", color=c, label=lab)
        axes[0, 1].plot(scales, s[v]["gnorm"], "o-", color=c, label=lab)
    axes[0, 0].set_ylabel("agreement of test predictions between seeds")
    axes[0, 0].set_ylim(0, 1.02)
    axes[0, 1].set_ylabel("gradient norm at initialisation")
    axes[0, 1].set_yscale("log")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        P.plain_ticks(ax)
        ax.set_xlabel("initial weight scale s")
        ax.legend(loc="best")
    P.nice_log_ticks(axes[0, 1], "y")
    axes[0, 0].set_title("Do seeds agree?")
    axes[0, 1].set_title("Gradient at initialisation")
    out.append(P.save(fig, d / "init_agreement.png"))
    runs = landscape_runs(data["landscape"])
    act = runs[0].get("activation", "relu") if runs else "relu"
    depths = sorted({r.get("depth", 0) for r in runs})
    fig, axes = P.subplots(len(depths), 3, size=(3.7, 3.0))
    for row, dep in enumerate(depths):
        for ax, key, lab in ((axes[row, 0], "loss_range_rel", "relative loss range"),
                             (axes[row, 1], "grad_change", "max ||g(w - eta g) - g||"),
                             (axes[row, 2], "beta", "effective beta-smoothness")):
            for v, name, c in (("plain", act, P.PLAIN), ("bn", f"BN + {act}", P.NORMED)):
                rs = [r for r in runs if r["variant"] == v and r.get("depth", 0) == dep
                      and r.get(key)]
                if not rs:
                    continue
                n = min(len(r[key]) for r in rs)
                P.mean_band(ax, rs[0]["steps"][:n],
                            [np.log10(np.maximum(np.asarray(r[key][:n], float), 1e-12))
                             for r in rs], color=c, label=name, lw=1)
            ax.set_xlabel("training step")
            ax.set_ylabel(f"log10 {lab}")
            ax.legend(loc="best", fontsize=6)
            ax.set_title(f"depth {dep}")
    out.append(P.save(fig, d / "init_landscape.png"))
    return out
