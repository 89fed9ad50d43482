"""How does batch norm allow larger learning rates?

Three measurements:

1. A learning-rate sweep over more than four decades x {plain, BN} x {sigmoid, ReLU} at a moderate
   depth (sweep runner): final training loss vs learning rate, the largest learning rate that still
   trains (no divergence and a final loss below the chance-level loss), and the BN/plain ratio.
2. Goodfellow, Bengio & Courville (2016, section 8.7.1)'s one-unit chain y = x*a*b*c*d*e: without
   normalisation the gradient of one weight is the product of all the others (dy/da = x*b*c*d*e),
   so one step size cannot suit every scale of the other weights; normalising each hidden unit over
   the batch removes that dependence.
3. BN's scale invariance (Ioffe & Szegedy 2015, section 3.3): BN((aW)u) = BN(Wu),
   dBN((aW)u)/du = dBN(Wu)/du and dBN((aW)u)/d(aW) = (1/a) dBN(Wu)/dW, measured in float64; and its
   consequence in training: weight norms grow under SGD, so the effective step
   ||dW|| / ||W|| (proportional to lr / ||W||^2) shrinks on its own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from signalprop.lab import plotting as P
from signalprop.lab.base import (
    CONTRADICTS,
    INCONCLUSIVE,
    SUPPORTS,
    Conclusion,
    cached,
    combine_verdicts,
    conclusion,
    fmt,
)
from signalprop.lab.common import MLP, get_data, init_linears_, seeded, train_classifier
from signalprop.lab.grid import grid_options, run_grid

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 1
NAME = "learning-rate"
TITLE = "Batch norm and the learning rate"
QUESTION = "How does batch norm allow larger learning rates?"
CLAIM = (
    "Batch norm lets a network train at larger learning rates than without it: the largest "
    "stable learning rate grows (Ioffe & Szegedy 2015), because normalising removes the "
    "dependence of one layer's gradient on the scale of the others (Goodfellow et al. 2016, "
    "8.7.1) and makes each layer scale-invariant, so that growing weights shrink the effective "
    "step (Ioffe & Szegedy 2015, 3.3)."
)
SETUP = (
    "Sweep: MLPs of moderate depth (LeCun init for sigmoid, He init for ReLU, zero biases) on "
    "scikit-learn digits, plain SGD, batch 64, learning rates from 1e-3 to 30, with and without "
    "batch norm before each activation. 'Trains' means: did not diverge and the final training "
    "loss is below 0.9 x ln(10) (chance level). Chain: y = x a b c d e with x ~ N(0,1) (batch "
    "256, float64), the Jacobian dy_i/dw (RMS over the batch) with a = 1 and the other weights "
    "b..e all set to s for s from 0.25 to 4; 'normalised' inserts a parameter-free batch normalisation "
    "after each multiplication but the last. Scale invariance: Linear(64, 64) + BatchNorm1d in "
    "float64, batch 128, weights scaled by a in [0.1, 10]. Effective step: a BN-sigmoid MLP "
    "trained with plain SGD at a large learning rate, recording ||W|| and ||dW||/||W|| of every "
    "hidden Linear layer (all followed by BN, hence scale-invariant) at every step."
)
REFERENCES = [
    "Ioffe & Szegedy 2015, Batch Normalization (sections 3.3 and 4.2)",
    "Goodfellow, Bengio & Courville 2016, Deep Learning, section 8.7.1",
]
CAPTIONS = {
    "lr_sweep": "Final training loss vs learning rate (log scale), with and without batch norm; "
    "crosses mark diverged runs; dotted line: chance-level loss ln(10); arrows: largest learning "
    "rate that trains.",
    "lr_chain": "Goodfellow's chain y = x a b c d e: dy/da and dy/de (RMS over the batch) as the "
    "other weights are scaled by s, without and with normalisation of each hidden unit (log-log; "
    "values below 1e-18 are drawn at 1e-18).",
    "lr_scale_invariance": "BN scale invariance in float64: output difference and relative error "
    "of a * dBN((aW)u)/d(aW) vs dBN(Wu)/dW, as a function of the weight scale a.",
    "lr_effective_step": "Training a BN-sigmoid MLP with plain SGD: weight norm of the hidden "
    "layers (left) and the relative update ||dW||/||W||, the effective step (right).",
}

CHANCE_FRACTION = 0.9  # "trains": final loss < 0.9 * ln(num_classes)

ARCHS = {
    "sigmoid": {"activation": "sigmoid", "norm": "none", "init": "lecun"},
    "sigmoid+BN": {"activation": "sigmoid", "norm": "batch", "init": "lecun"},
    "relu": {"activation": "relu", "norm": "none", "init": "kaiming"},
    "relu+BN": {"activation": "relu", "norm": "batch", "init": "kaiming"},
}


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {"depth": 3, "width": 32, "steps": 40, "lrs": [0.01, 0.3, 10.0],
                         "chain_scales": [0.5, 1.0, 2.0], "step_steps": 40, "step_depth": 2}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "data": "digits",
        "depth": 8 if quick else 10,
        "width": 64,
        "steps": 300 if quick else 1000,
        "batch_size": 64,
        "lrs": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
        "seeds": 1 if quick else 3,
        "chain_scales": [float(s) for s in np.logspace(np.log10(0.25), np.log10(4.0), 13)],
        "chain_batch": 256,
        "invariance_scales": [0.1, 0.3, 1.0, 3.0, 10.0],
        "step_lr": 1.0,
        "step_steps": 300 if quick else 2000,
        "step_depth": 4,
        "device": "cpu",
    }


# --- 1. the sweep -------------------------------------------------------------------------
def _sweep(config: dict[str, Any], workdir: str | Path) -> list[dict[str, Any]]:
    grid = {
        "base": {
            "data": config["data"], "depth": config["depth"], "width": config["width"],
            "steps": config["steps"], "batch_size": config["batch_size"], "optimizer": "sgd",
            "record_every": 0, "device": config["device"],
        },
        "axes": {"arch": ARCHS, "lr": list(config["lrs"])},
        "seeds": config["seeds"],
    }
    rows = run_grid(grid, workdir, "lr-sweep", **grid_options(config))
    keep = ("arch", "lr", "seed", "status", "final_loss", "train_loss", "test_accuracy",
            "diverged_step")
    return [{k: r.get(k) for k in keep} for r in rows]


# --- 2. Goodfellow's chain ------------------------------------------------------------------
def _chain(config: dict[str, Any]) -> dict[str, Any]:
    """RMS over the batch of dy_i/da and dy_i/de for the chain y = x a b c d e, with b..e = s."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(config["chain_batch"], generator=g, dtype=torch.float64)
    out: dict[str, Any] = {"scales": list(config["chain_scales"])}
    for variant in ("plain", "normalised"):

        def f(w: torch.Tensor, variant: str = variant) -> torch.Tensor:
            h = x
            for k in range(5):
                h = h * w[k]
                if variant == "normalised" and k < 4:
                    # parameter-free batch normalisation of the hidden unit (BN's default eps)
                    h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + 1e-5)
            return h

        da, de = [], []
        for s in config["chain_scales"]:
            w = torch.tensor([1.0, s, s, s, s], dtype=torch.float64)
            jac = torch.autograd.functional.jacobian(f, w)  # [B, 5]: dy_i / dw_k
            rms = jac.pow(2).mean(0).sqrt()
            da.append(float(rms[0]))
            de.append(float(rms[4]))
        out[variant] = {"dy_da": da, "dy_de": de}
    return out


# --- 3. scale invariance and the effective step ------------------------------------------------
def _invariance(config: dict[str, Any]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    u = torch.randn(128, 64, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, 64, generator=g, dtype=torch.float64) / 8.0
    up = torch.randn(128, 64, generator=g, dtype=torch.float64)  # a fixed upstream gradient

    def f(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = weight.clone().requires_grad_(True)
        y = F.batch_norm(u @ weight.T, None, None, training=True, eps=1e-5)
        gw, gu = torch.autograd.grad((y * up).sum(), (weight, u))
        return y.detach(), gw, gu

    y0, gw0, gu0 = f(w)
    rows = []
    for a in config["invariance_scales"]:
        ya, gwa, gua = f(a * w)
        rows.append({
            "a": a,
            "out_max_abs_diff": float((ya - y0).abs().max()),
            "grad_w_rel_err": float((a * gwa - gw0).norm() / gw0.norm()),
            "grad_u_rel_err": float((gua - gu0).norm() / gu0.norm()),
            "grad_w_norm_ratio": float(gwa.norm() / gw0.norm()),
        })
    return {"rows": rows}


def _effective_step(config: dict[str, Any]) -> dict[str, Any]:
    data = get_data(config["data"], config["device"])
    g = seeded(0)
    model = MLP(data.in_features, data.num_classes, config["width"], config["step_depth"],
                activation="sigmoid", norm="bn")
    init_linears_(model.linears(), "gaussian", 1.0, generator=g)
    model.to(config["device"])
    hidden = [b.linear.weight for b in model.blocks]
    prev = [w.detach().clone() for w in hidden]
    steps, wnorm, ratio = [], [], []

    def cb(step: int, m: nn.Module, loss: float, res: Any) -> None:
        nonlocal prev
        with torch.no_grad():
            now = [w.detach().clone() for w in hidden]
            wn = [float(p.norm()) for p in prev]
            rr = [float((a - b).norm() / b.norm()) for a, b in zip(now, prev, strict=True)]
        steps.append(step)
        wnorm.append(wn)
        ratio.append(rr)
        prev = now

    r = train_classifier(model, data, steps=config["step_steps"], batch_size=config["batch_size"],
                         optimizer="sgd", lr=config["step_lr"], seed=0, callback=cb)
    return {"steps": steps, "weight_norm": wnorm, "update_ratio": ratio, "lr": config["step_lr"],
            "diverged": r.diverged, "final_test_acc": r.final_test_acc}


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    key = {k: v for k, v in config.items() if k != "executor"}
    return {
        "sweep": _sweep(config, workdir),
        "chain": cached(workdir, {**key, "part": "chain"}, lambda: _chain(config), tag="chain"),
        "invariance": cached(workdir, {**key, "part": "inv"}, lambda: _invariance(config),
                             tag="inv"),
        "effective_step": cached(workdir, {**key, "part": "step"},
                                 lambda: _effective_step(config), tag="step"),
        "chance_loss": math.log(10),
        "lrs": list(config["lrs"]),
    }


# --- conclusions ---------------------------------------------------------------------------
def largest_trainable_lr(rows: list[dict[str, Any]], arch: str, chance_loss: float) -> float:
    """The largest learning rate at which every seed of ``arch`` trained (no divergence, final
    training loss below ``CHANCE_FRACTION`` x the chance-level loss); NaN when none did."""
    best = math.nan
    lrs = sorted({r["lr"] for r in rows if r["arch"] == arch})
    for lr in lrs:
        rs = [r for r in rows if r["arch"] == arch and r["lr"] == lr]
        good = all(
            r["status"] == "done"
            and r["train_loss"] is not None
            and math.isfinite(float(r["train_loss"]))
            and float(r["train_loss"]) < CHANCE_FRACTION * chance_loss
            for r in rs
        )
        if good:
            best = lr
    return best


def conclude(data: dict[str, Any]) -> Conclusion:
    nums: dict[str, Any] = {}
    details: list[str] = []
    verdicts: list[str] = []
    rows = data["sweep"]
    chance = float(data["chance_loss"])
    lr_max = max(data["lrs"])
    ratios = {}
    for act in ("sigmoid", "relu"):
        lp = largest_trainable_lr(rows, act, chance)
        lb = largest_trainable_lr(rows, f"{act}+BN", chance)
        nums[f"largest trainable lr, {act}"] = lp
        nums[f"largest trainable lr, {act}+BN"] = lb
        if math.isnan(lb) and math.isnan(lp):
            v = INCONCLUSIVE
            details.append(f"{act}: neither the plain nor the BN network trained at any rate.")
        elif math.isnan(lp):
            v = SUPPORTS
            ratios[act] = math.inf
            details.append(f"{act}: the plain network trained at no rate in the grid; with BN up "
                           f"to lr = {fmt(lb)}.")
        elif math.isnan(lb):
            v = CONTRADICTS
            ratios[act] = 0.0
            details.append(f"{act}: the plain network trained up to lr = {fmt(lp)} but the BN "
                           "network at no rate: BN did NOT allow larger rates.")
        else:
            ratios[act] = lb / lp
            v = SUPPORTS if lb > lp else (INCONCLUSIVE if lb == lp else CONTRADICTS)
            extra = " (the largest rate in the grid: the true limit may be higher)" \
                if lb == lr_max else ""
            details.append(
                f"{act}: largest rate that trains {fmt(lb)} with BN vs {fmt(lp)} without "
                f"(ratio {fmt(lb / lp)}){extra}"
                + ("; BN did NOT allow a larger rate." if v == CONTRADICTS else ".")
            )
        nums[f"lr ratio BN/plain, {act}"] = ratios.get(act, math.nan)
        verdicts.append(v)
    # chain
    ch = data["chain"]
    pa = np.asarray(ch["plain"]["dy_da"])
    na = np.asarray(ch["normalised"]["dy_da"])
    ne = np.asarray(ch["normalised"]["dy_de"])
    pe = np.asarray(ch["plain"]["dy_de"])
    span_plain = float(pa.max() / max(pa.min(), 1e-300))
    span_norm_e = float(ne.max() / max(ne.min(), 1e-300))
    span_plain_e = float(pe.max() / max(pe.min(), 1e-300))
    s = ch["scales"]
    nums["chain: spread of dy/da over s, plain (max/min)"] = span_plain
    nums["chain: spread of dy/de over s, plain"] = span_plain_e
    nums["chain: spread of dy/de over s, normalised"] = span_norm_e
    nums["chain: largest dy/da, normalised"] = float(na.max())
    nums["chain: smallest dy/da, plain"] = float(pa.min())
    v_chain = (
        SUPPORTS if span_plain > 10 and span_norm_e < 1.5 and na.max() < 1e-3 * pa.min()
        else CONTRADICTS if span_norm_e >= span_plain_e
        else INCONCLUSIVE
    )
    details.append(
        f"Chain y = x a b c d e: as the other weights go from {fmt(min(s))} to {fmt(max(s))}, "
        f"dy/da (RMS over the batch) spans a factor {fmt(span_plain)} without normalisation; "
        f"with it, dy/da is at most {fmt(float(na.max()))} (the lower weight no longer matters) "
        f"and dy/de varies by a factor {fmt(span_norm_e)} (plain: {fmt(span_plain_e)})."
    )
    verdicts.append(v_chain)
    # invariance
    inv = data["invariance"]["rows"]
    out_err = max(r["out_max_abs_diff"] for r in inv)
    gw_err = max(r["grad_w_rel_err"] for r in inv)
    gu_err = max(r["grad_u_rel_err"] for r in inv)
    nums["BN(aW u) - BN(W u), max abs"] = out_err
    nums["a dBN/d(aW) vs dBN/dW, max rel err"] = gw_err
    nums["dBN/du at aW vs at W, max rel err"] = gu_err
    tol = 1e-2  # BN's eps (1e-5 on the variance) breaks exact invariance at small a
    v_inv = SUPPORTS if max(out_err, gw_err, gu_err) < tol else CONTRADICTS
    details.append(
        f"Scale invariance (float64, a in {fmt(min(r['a'] for r in inv))}..{fmt(max(r['a'] for r in inv))}): "
        f"max |BN((aW)u) - BN(Wu)| = {fmt(out_err)}, relative error of "
        f"a dBN/d(aW) = dBN/dW: {fmt(gw_err)}, of dBN/du: {fmt(gu_err)} (eps = 1e-5 is the only "
        "source of deviation)."
    )
    verdicts.append(v_inv)
    # effective step
    es = data["effective_step"]
    wn = np.asarray(es["weight_norm"], dtype=float)  # [T, L]
    ur = np.asarray(es["update_ratio"], dtype=float)
    if wn.shape[0] >= 20 and np.isfinite(wn).all():
        k = max(1, wn.shape[0] // 10)
        growth = float(np.mean(wn[-k:].mean(0) / wn[:k].mean(0)))
        early, late = float(np.median(ur[:k])), float(np.median(ur[-k:]))
        nums["weight norm growth (last/first 10% of steps)"] = growth
        nums["relative update, first 10% of steps (median)"] = early
        nums["relative update, last 10% of steps (median)"] = late
        nums["predicted effective-lr factor 1/growth^2"] = 1.0 / growth**2
        if growth > 1.05 and late < early:
            v_step = SUPPORTS
        elif growth <= 1.0:
            v_step = CONTRADICTS
        else:
            v_step = INCONCLUSIVE
        details.append(
            f"Effective step: under SGD at lr = {fmt(es.get('lr', math.nan))} the hidden weights' "
            f"norm grew by a factor {fmt(growth)} (effective rate x {fmt(1 / growth**2)}), and the "
            f"relative update fell from {fmt(early)} to {fmt(late)}"
            + (" (the weights did NOT grow)." if v_step == CONTRADICTS else ".")
        )
        verdicts.append(v_step)
    verdict = combine_verdicts(verdicts)
    r_s, r_r = ratios.get("sigmoid", math.nan), ratios.get("relu", math.nan)
    sentence = (
        f"Largest learning rate that trains, BN vs plain: sigmoid {fmt(nums['largest trainable lr, sigmoid+BN'])}"
        f" vs {fmt(nums['largest trainable lr, sigmoid'])} (x{fmt(r_s)}), ReLU "
        f"{fmt(nums['largest trainable lr, relu+BN'])} vs {fmt(nums['largest trainable lr, relu'])}"
        f" (x{fmt(r_r)}); in the chain, normalisation removes the dependence of one weight's "
        f"gradient on the others (spread {fmt(span_plain)} -> {fmt(span_norm_e)}); BN is scale "
        f"invariant to {fmt(max(out_err, gw_err))}."
    )
    contra = [d for d in details if "NOT" in d]
    if contra:
        sentence += " Contradicted: " + " ".join(contra)
    return conclusion(CLAIM, sentence, verdict, nums, details)


# --- figures ---------------------------------------------------------------------------------
def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    out = []
    rows = data["sweep"]
    chance = float(data["chance_loss"])
    fig, axes = P.subplots(1, 2, size=(4.6, 3.5), sharey=True)
    colors = {"sigmoid": P.PLAIN, "sigmoid+BN": P.NORMED, "relu": P.PLAIN, "relu+BN": P.NORMED}
    finite_losses = [float(r["train_loss"]) for r in rows if r["train_loss"] is not None
                     and np.isfinite(float(r["train_loss"]))]
    top = max(finite_losses + [chance]) * 1.5 if finite_losses else 10.0
    for ax, act in zip(axes[0], ("sigmoid", "relu"), strict=True):
        for arch in (act, f"{act}+BN"):
            rs = [r for r in rows if r["arch"] == arch]
            lrs = sorted({r["lr"] for r in rs})
            mean, div = [], []
            for lr in lrs:
                vals = [float(r["train_loss"]) if r["status"] == "done" and r["train_loss"]
                        is not None else math.nan for r in rs if r["lr"] == lr]
                v = np.asarray(vals, dtype=float)
                mean.append(np.nanmean(v) if np.isfinite(v).any() else math.nan)
                div.append(not np.isfinite(v).all())
            ax.plot(lrs, mean, "o-", color=colors[arch], label=arch)
            xs = [lr for lr, dv in zip(lrs, div, strict=True) if dv]
            if xs:
                ax.plot(xs, [top * 0.8] * len(xs), "x", color=colors[arch], ms=8,
                        label=f"{arch}: diverged")
            best = largest_trainable_lr(rows, arch, chance)
            if np.isfinite(best):
                ax.axvline(best, color=colors[arch], ls="--", lw=0.8)
        ax.axhline(chance, color="#555555", ls=":", lw=1, label="chance ln(10)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate (SGD)")
        ax.set_ylabel("final training loss")
        ax.set_title(f"{act}: plain vs batch norm")
        ax.legend(loc="best")
    out.append(P.save(fig, d / "lr_sweep.png"))
    # chain
    ch = data["chain"]
    fig, axes = P.subplots(1, 2, size=(4.4, 3.4))
    s = np.asarray(ch["scales"])
    floor = 1e-18
    for ax, key, title in ((axes[0, 0], "dy_da", "dy/da (first weight)"),
                           (axes[0, 1], "dy_de", "dy/de (last weight)")):
        ax.plot(s, np.maximum(ch["plain"][key], floor), "o-", color=P.PLAIN, label="plain chain")
        ax.plot(s, np.maximum(ch["normalised"][key], floor), "s-", color=P.NORMED,
                label="normalised hidden units")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([0.25, 0.5, 1, 2, 4])
        P.plain_ticks(ax)
        ax.set_xlabel("scale s of the other weights")
        ax.set_ylabel(f"{title}, RMS over the batch")
        ax.set_title(f"y = x a b c d e: {title}")
        ax.legend(loc="best")
    out.append(P.save(fig, d / "lr_chain.png"))
    # invariance
    inv = data["invariance"]["rows"]
    fig, axes = P.subplots(1, 1, size=(5.2, 3.4))
    ax = axes[0, 0]
    a = [r["a"] for r in inv]
    for key, lab, c in (("out_max_abs_diff", "max |BN((aW)u) - BN(Wu)|", P.PLAIN),
                        ("grad_w_rel_err", "rel. err. of a dBN/d(aW) = dBN/dW", P.NORMED),
                        ("grad_u_rel_err", "rel. err. of dBN/du (aW vs W)", P.THIRD)):
        # at a = 1 both sides are the same computation (difference exactly 0): left out
        vals = [r[key] if r[key] > 0 else np.nan for r in inv]
        ax.plot(a, vals, "o-", color=c, label=lab)
    ax.plot(a, [r["grad_w_norm_ratio"] for r in inv], "k^", label="||dBN/d(aW)|| / ||dBN/dW||")
    ax.plot(a, [1.0 / x for x in a], "k:", lw=1, label="theory: 1/a")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weight scale a")
    ax.set_ylabel("difference / ratio")
    ax.set_title("Batch norm under a rescaling W -> aW")
    ax.legend(loc="best", fontsize=7)
    out.append(P.save(fig, d / "lr_scale_invariance.png"))
    # effective step
    es = data["effective_step"]
    wn = np.asarray(es["weight_norm"], dtype=float)
    ur = np.asarray(es["update_ratio"], dtype=float)
    if wn.size:
        fig, axes = P.subplots(1, 2, size=(4.4, 3.4))
        st = np.asarray(es["steps"])
        for li in range(wn.shape[1]):
            axes[0, 0].plot(st, wn[:, li], label=f"hidden layer {li + 1}")
            k = max(1, len(st) // 30)
            sm = np.convolve(ur[:, li], np.ones(k) / k, mode="valid")
            axes[0, 1].plot(st[k - 1:], sm, label=f"hidden layer {li + 1}")
        axes[0, 0].set_xlabel("training step")
        axes[0, 0].set_ylabel("||W||")
        axes[0, 0].set_title("weight norm of the BN-normalised layers")
        axes[0, 1].set_xlabel("training step")
        axes[0, 1].set_ylabel("||dW|| / ||W|| (moving average)")
        axes[0, 1].set_yscale("log")
        P.nice_log_ticks(axes[0, 1], "y")
        axes[0, 1].set_title("relative update (effective step)")
        axes[0, 0].legend(loc="best")
        out.append(P.save(fig, d / "lr_effective_step.png"))
    return out
