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

from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import grid as G
from signalprop.lab import nets
from signalprop.lab import plotting as P

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 3
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
    "Sweep: MLPs (ReLU: depth 8 quick / 10 full, He init; sigmoid: depth 3, where the plain "
    "network trains at some rate, LeCun init; zero biases) on "
    "scikit-learn digits, plain SGD, batch 64, learning rates from 1e-3 to 30, with and without "
    "batch norm before each activation. 'Trains' means: did not diverge and the final training "
    "loss is below 0.9 x ln(10) (chance level); per seed, the largest rate of the grid at which "
    "it trains; BN/plain as a ratio of geometric means over seeds with a Welch 95% interval on "
    "the logs (3 seeds quick, 5 full). Chain: y = x a b c d e with x ~ N(0,1) (batch "
    "256, float64), the Jacobian dy_i/dw (RMS over the batch) with a = 1 and the other weights "
    "b..e all set to s for s from 0.25 to 4; 'normalised' inserts a parameter-free batch normalisation "
    "after each multiplication but the last. Scale invariance: Linear(64, 64) + BatchNorm1d in "
    "float64, batch 128, weights scaled by a in [0.1, 10], with eps = 0 (exact invariance: "
    "float64 rounding only) and with PyTorch's eps = 1e-5 (the deviation eps causes). Effective "
    "step: a BN-sigmoid MLP trained by signalprop.train.fit with plain SGD at a large learning "
    "rate; ||W|| and ||dW||/||W|| of every hidden Linear layer (all followed by BN, hence "
    "scale-invariant) are the probe's weight_norm and update_ratio every 2 steps (3 seeds quick, 5 full)."
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
    "layers (left) and the relative update ||dW||/||W||, the effective step (right), from the "
    "probe's record; mean over seeds with 95% intervals.",
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
                         "chain_scales": [0.5, 1.0, 2.0], "step_steps": 40, "step_depth": 2,
                         "seeds": 3}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "data": "digits",
        "depth": 8 if quick else 10,
        # the plain sigmoid network must train at some rate for a rate ratio to exist: at depth
        # 8 it trains at none (vanishing gradients), at depth 3 it does
        "sigmoid_depth": 3,
        "width": 64,
        "steps": 300 if quick else 1000,
        "batch_size": 64,
        "lrs": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
        "seeds": 3 if quick else 5,
        "chain_scales": [float(s) for s in np.logspace(np.log10(0.25), np.log10(4.0), 13)],
        "chain_batch": 256,
        "invariance_scales": [0.1, 0.3, 1.0, 3.0, 10.0],
        "step_lr": 1.0,
        "step_steps": 300 if quick else 2000,
        "step_depth": 4,
        "step_seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
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
        "axes": {"arch": {k: {**v, **({"depth": config["sigmoid_depth"]} if v["activation"] ==
                                      "sigmoid" and "sigmoid_depth" in config else {})}
                          for k, v in ARCHS.items()},
                 "lr": list(config["lrs"])},
        "seeds": config["seeds"],
    }
    rows = G.run_grid(grid, workdir, "lr-sweep", **G.grid_options(config))
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
    out: dict[str, Any] = {}
    for key, eps in (("rows", 0.0), ("rows_eps", 1e-5)):

        def f(weight: torch.Tensor, eps: float = eps) -> tuple[torch.Tensor, ...]:
            weight = weight.clone().requires_grad_(True)
            z = u @ weight.T  # batch norm in training mode, written out: F.batch_norm refuses eps 0
            y = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)
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
        out[key] = rows
    return out


def _effective_step(config: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Weight norm and relative update of the BN-normalised hidden layers, read from the probe's
    record (``weight_norm``, ``update_ratio``) of a run of the package's loop."""
    data = nets.dataset(config["data"], config["device"])
    model = nets.mlp(data, config["width"], config["step_depth"], "sigmoid", "batch",
                     nonlinearity="linear", seed=seed)
    r, _, _ = nets.train(model, data, steps=config["step_steps"], lr=config["step_lr"],
                         batch_size=config["batch_size"], seed=seed,
                         probe={"forward": False, "backward": False}, schedule=2)
    names = [f"layers.{i}.linear.weight" for i in range(config["step_depth"])]
    st, _, wn = r.record.matrix("weight_norm", names)
    st2, _, ur = r.record.matrix("update_ratio", names)
    n = min(len(st), len(st2))
    return {"seed": seed, "steps": st[:n].tolist(), "weight_norm": wn[:n].tolist(),
            "update_ratio": ur[:n].tolist(), "lr": config["step_lr"], "diverged": r.diverged}


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    key = {k: v for k, v in config.items() if k != "executor"}
    sweep = _sweep(config, workdir)
    chain, inv, *step = B.cached_cells(workdir, [
        B.Cell({**key, "part": "chain"}, _chain, (config,), tag="chain"),
        B.Cell({**key, "part": "inv"}, _invariance, (config,), tag="inv"),
        *(B.Cell({**key, "part": "step", "seed": sd}, _effective_step, (config, sd), tag="step")
          for sd in config.get("step_seeds", [0]))], workers=config.get("workers", 1))
    return {
        "sweep": sweep,
        "chain": chain,
        "invariance": inv,
        "effective_step": step,
        "chance_loss": math.log(10),
        "lrs": list(config["lrs"]),
    }


# --- conclusions ---------------------------------------------------------------------------
def largest_trainable_lr(rows: list[dict[str, Any]], arch: str, chance_loss: float,
                         seed: int | None = None) -> float:
    """The largest learning rate at which every seed of ``arch`` (or the one ``seed``) trained
    (no divergence, final training loss below ``CHANCE_FRACTION`` x the chance-level loss); NaN
    when none did."""
    best = math.nan
    rows = [r for r in rows if seed is None or r.get("seed") == seed]
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


def _span(v: Any) -> float:
    a = np.asarray(v, dtype=float)
    return float(a.max() / max(a.min(), 1e-300))


def measure_sweep(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per activation: the largest trainable rate (all seeds, and per seed) with and without BN,
    and the BN/plain ratio of the per-seed rates (a seed that trains at no rate counts at the
    grid's lowest rate / 3, a bound) when both train somewhere."""
    rows, chance = data["sweep"], float(data["chance_loss"])
    seeds = sorted({r.get("seed", 0) for r in rows})
    floor = min(data["lrs"]) / 3
    out = {}
    for act in ("sigmoid", "relu"):
        per_p = [largest_trainable_lr(rows, act, chance, s) for s in seeds]
        per_b = [largest_trainable_lr(rows, f"{act}+BN", chance, s) for s in seeds]
        m = {"plain": largest_trainable_lr(rows, act, chance),
             "bn": largest_trainable_lr(rows, f"{act}+BN", chance),
             "plain_never": all(math.isnan(x) for x in per_p),
             "bn_never": all(math.isnan(x) for x in per_b), "ratio": None}
        if not m["plain_never"] and not m["bn_never"]:
            m["ratio"] = E.log_ratio_effect([x if not math.isnan(x) else floor for x in per_b],
                                            [x if not math.isnan(x) else floor for x in per_p],
                                            f"largest trainable lr BN/plain, {act}")
        out[act] = m
    return out


def measure_chain(ch: dict[str, Any]) -> dict[str, float]:
    """Spreads (max/min over the scales s) of the chain's gradients, plain and normalised."""
    return {"span_a_plain": _span(ch["plain"]["dy_da"]),
            "span_e_plain": _span(ch["plain"]["dy_de"]),
            "span_e_norm": _span(ch["normalised"]["dy_de"]),
            "max_a_norm": float(np.max(ch["normalised"]["dy_da"])),
            "min_a_plain": float(np.min(ch["plain"]["dy_da"]))}


def measure_step(runs: Any) -> dict[str, Any] | None:
    """Per seed, from the probe record: weight-norm growth and relative-update change from the
    first to the last 10% of recordings, as mean effects on the logs."""
    runs = runs if isinstance(runs, list) else [runs]
    growth, drop = [], []
    for es in runs:
        wn = np.asarray(es["weight_norm"], dtype=float)  # [T, L]
        ur = np.asarray(es["update_ratio"], dtype=float)
        if wn.ndim == 2 and wn.shape[0] >= 20 and np.isfinite(wn).all():
            k = max(1, wn.shape[0] // 10)
            growth.append(float(np.mean(wn[-k:].mean(0) / wn[:k].mean(0))))
            drop.append(float(np.nanmedian(ur[-k:]) / np.nanmedian(ur[:k])))
    if not growth:
        return None
    return {"n": len(growth), "lr": runs[0].get("lr", math.nan),
            "growth": E.mean_effect([math.log(g) for g in growth], "log weight-norm growth"),
            "drop": E.mean_effect([math.log(d) for d in drop], "log relative-update change")}


def _say_sweep(m: dict[str, Any], lrs: list[float], nums: dict[str, Any]) -> tuple[str, str]:
    act = m["act"]
    lp, lb = m["plain"], m["bn"]
    nums[f"largest trainable lr, {act}"] = lp
    nums[f"largest trainable lr, {act}+BN"] = lb
    eff = m["ratio"]
    nums[f"lr ratio BN/plain, {act}"] = eff.estimate if eff is not None else \
        (0.0 if m["bn_never"] and not m["plain_never"] else math.nan)
    if m["plain_never"]:
        return (f"{act}: the plain network trained at no rate in {B.fmt(min(lrs))}.."
                f"{B.fmt(max(lrs))} (any seed)"
                + (f"; with BN up to lr = {B.fmt(lb)}" if not math.isnan(lb) else
                   ", nor did the BN network")
                + ": BN makes it trainable, but with no plain rate to compare no rate ratio "
                "can be formed (inconclusive for the claim about larger rates).", B.INCONCLUSIVE)
    if m["bn_never"]:
        return (f"{act}: the plain network trained up to lr = {B.fmt(lp)} but the BN network at "
                "no rate: BN did NOT allow larger rates.", B.CONTRADICTS)
    v = E.verdict(eff, +1)
    nums.update(E.numbers(eff))
    extra = " (the largest rate in the grid: the true limit may be higher)" \
        if lb == max(lrs) else ""
    return (f"{act}: largest rate that trains (all seeds) {B.fmt(lb)} with BN vs {B.fmt(lp)} "
            f"without; per seed, {E.describe(eff, v)}{extra}"
            + ("; BN did NOT allow a larger rate." if v == B.CONTRADICTS else "."), v)


def _say_chain(c: dict[str, float], s: list[float], nums: dict[str, Any]) -> tuple[str, str]:
    nums.update({"chain: spread of dy/da over s, plain (max/min)": c["span_a_plain"],
                 "chain: spread of dy/de over s, plain": c["span_e_plain"],
                 "chain: spread of dy/de over s, normalised": c["span_e_norm"],
                 "chain: largest dy/da, normalised": c["max_a_norm"],
                 "chain: smallest dy/da, plain": c["min_a_plain"]})
    v = (B.SUPPORTS if c["span_a_plain"] > 10 and c["span_e_norm"] < 1.5
         and c["max_a_norm"] < 1e-3 * c["min_a_plain"]
         else B.CONTRADICTS if c["span_e_norm"] >= c["span_e_plain"] else B.INCONCLUSIVE)
    return (f"Chain y = x a b c d e: as the other weights go from {B.fmt(min(s))} to "
            f"{B.fmt(max(s))}, dy/da (RMS over the batch) spans a factor "
            f"{B.fmt(c['span_a_plain'])} without normalisation; with it, dy/da is at most "
            f"{B.fmt(c['max_a_norm'])} (the lower weight no longer matters) and dy/de varies by "
            f"a factor {B.fmt(c['span_e_norm'])} (plain: {B.fmt(c['span_e_plain'])}).", v)


#: Scale invariance holds to float64 rounding through a batch of 128 and 64 features.
INVARIANCE_TOL = 1e-10


def _say_invariance(inv: dict[str, Any], nums: dict[str, Any]) -> tuple[str, str, float]:
    rows = inv["rows"]
    out_err = max(r["out_max_abs_diff"] for r in rows)
    gw_err = max(r["grad_w_rel_err"] for r in rows)
    gu_err = max(r["grad_u_rel_err"] for r in rows)
    eps_err = max((max(r["out_max_abs_diff"], r["grad_w_rel_err"])
                   for r in inv.get("rows_eps") or []), default=math.nan)
    nums.update({"BN(aW u) - BN(W u), max abs (eps 0)": out_err,
                 "a dBN/d(aW) vs dBN/dW, max rel err (eps 0)": gw_err,
                 "dBN/du at aW vs at W, max rel err (eps 0)": gu_err,
                 "deviation with eps 1e-5": eps_err})
    v = B.SUPPORTS if max(out_err, gw_err, gu_err) < INVARIANCE_TOL else B.CONTRADICTS
    return (f"Scale invariance (float64, eps = 0, a in {B.fmt(min(r['a'] for r in rows))}.."
            f"{B.fmt(max(r['a'] for r in rows))}; an exact computation, no seeds): max "
            f"|BN((aW)u) - BN(Wu)| = {B.fmt(out_err)}, relative error of a dBN/d(aW) = dBN/dW: "
            f"{B.fmt(gw_err)}, of dBN/du: {B.fmt(gu_err)} (tolerance {B.fmt(INVARIANCE_TOL)}); "
            f"with PyTorch's eps = 1e-5 the deviation is {B.fmt(eps_err)}, all of it from "
            "eps.", v, max(out_err, gw_err))


def _say_step(m: dict[str, Any], nums: dict[str, Any]) -> tuple[str, str]:
    eg, ed = m["growth"], m["drop"]
    vg, vd = E.verdict(eg, +1), E.verdict(ed, -1)
    gm = math.exp(eg.estimate)
    nums.update({"weight norm growth (last/first 10% of steps)": gm,
                 "weight norm growth 95% CI": [math.exp(eg.lo), math.exp(eg.hi)],
                 "relative update late/early": math.exp(ed.estimate),
                 "relative update late/early 95% CI": [math.exp(ed.lo), math.exp(ed.hi)],
                 "predicted effective-lr factor 1/growth^2": 1.0 / gm**2})
    return (f"Effective step (probe's weight_norm and update_ratio, {m['n']} seeds): under SGD "
            f"at lr = {B.fmt(m['lr'])} the hidden weights' norm grew by a factor {B.fmt(gm)} "
            f"[95% CI {B.fmt(math.exp(eg.lo))}, {B.fmt(math.exp(eg.hi))}] (effective rate x "
            f"{B.fmt(1 / gm**2)}) and the relative update changed by a factor "
            f"{B.fmt(math.exp(ed.estimate))} [95% CI {B.fmt(math.exp(ed.lo))}, "
            f"{B.fmt(math.exp(ed.hi))}] from the first to the last 10% of steps"
            + (" (the weights did NOT grow)." if vg == B.CONTRADICTS else "."),
            B.combine_verdicts([vg, vd]))


def conclude(data: dict[str, Any]) -> B.Conclusion:
    nums: dict[str, Any] = {}
    said = [_say_sweep({**m, "act": act}, data["lrs"], nums)
            for act, m in measure_sweep(data).items()]
    chain = measure_chain(data["chain"])
    said.append(_say_chain(chain, data["chain"]["scales"], nums))
    s_inv, v_inv, inv_err = _say_invariance(data["invariance"], nums)
    said.append((s_inv, v_inv))
    step = measure_step(data["effective_step"])
    if step is not None:
        said.append(_say_step(step, nums))
    details = [d for d, _ in said]
    sentence = (" ".join(details[:2]) + " In the chain, normalisation removes the dependence of "
                f"one weight's gradient on the others (spread {B.fmt(chain['span_a_plain'])} -> "
                f"{B.fmt(chain['span_e_norm'])}); BN is scale invariant to {B.fmt(inv_err)}.")
    contra = [d for d in details if "NOT" in d]
    if contra:
        sentence += " Contradicted: " + " ".join(contra)
    return B.conclusion(CLAIM, sentence, B.combine_verdicts([v for _, v in said]), nums, details)


# --- figures ---------------------------------------------------------------------------------
def _sweep_curve(rows: list[dict[str, Any]], arch: str) -> tuple[list, list, list]:
    """(rates, mean final loss over seeds, whether any seed diverged) of one architecture."""
    rs = [r for r in rows if r["arch"] == arch]
    lrs = sorted({r["lr"] for r in rs})
    mean, div = [], []
    for lr in lrs:
        v = np.asarray([float(r["train_loss"]) if r["status"] == "done" and r["train_loss"]
                        is not None else math.nan for r in rs if r["lr"] == lr], dtype=float)
        mean.append(np.nanmean(v) if np.isfinite(v).any() else math.nan)
        div.append(not np.isfinite(v).all())
    return lrs, mean, div


def _fig_sweep(rows: list[dict[str, Any]], chance: float, path: Path) -> Path:
    fig, axes = P.subplots(1, 2, size=(4.6, 3.5), sharey=True)
    colors = {"sigmoid": P.PLAIN, "sigmoid+BN": P.NORMED, "relu": P.PLAIN, "relu+BN": P.NORMED}
    finite = [float(r["train_loss"]) for r in rows if r["train_loss"] is not None
              and np.isfinite(float(r["train_loss"]))]
    top = max(finite + [chance]) * 1.5 if finite else 10.0
    for ax, act in zip(axes[0], ("sigmoid", "relu"), strict=True):
        for arch in (act, f"{act}+BN"):
            lrs, mean, div = _sweep_curve(rows, arch)
            ax.plot(lrs, mean, "o-", color=colors[arch], label=arch)
            xs = [lr for lr, dv in zip(lrs, div, strict=True) if dv]
            if xs:
                ax.plot(xs, [top * 0.8] * len(xs), "x", color=colors[arch], ms=8,
                        label=f"{arch}: diverged")
            best = largest_trainable_lr(rows, arch, chance)
            if np.isfinite(best):
                ax.axvline(best, color=colors[arch], ls="--", lw=0.8)
        ax.axhline(chance, color="#555555", ls=":", lw=1, label="chance ln(10)")
        P.finish(ax, "learning rate (SGD)", "final training loss",
                 f"{act}: plain vs batch norm", xscale="log", yscale="log")
    return P.save(fig, path)


def _fig_chain(ch: dict[str, Any], path: Path) -> Path:
    fig, axes = P.subplots(1, 2, size=(4.4, 3.4))
    s = np.asarray(ch["scales"])
    floor = 1e-18
    for ax, key, title in ((axes[0, 0], "dy_da", "dy/da (first weight)"),
                           (axes[0, 1], "dy_de", "dy/de (last weight)")):
        ax.plot(s, np.maximum(ch["plain"][key], floor), "o-", color=P.PLAIN, label="plain chain")
        ax.plot(s, np.maximum(ch["normalised"][key], floor), "s-", color=P.NORMED,
                label="normalised hidden units")
        P.finish(ax, "scale s of the other weights", f"{title}, RMS over the batch",
                 f"y = x a b c d e: {title}", xscale="log2", yscale="log")
        ax.set_xticks([0.25, 0.5, 1, 2, 4])
    return P.save(fig, path)


def _fig_invariance(inv: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = P.panel((5.2, 3.4))
    a = [r["a"] for r in inv]
    for key, lab, c in (("out_max_abs_diff", "max |BN((aW)u) - BN(Wu)|", P.PLAIN),
                        ("grad_w_rel_err", "rel. err. of a dBN/d(aW) = dBN/dW", P.NORMED),
                        ("grad_u_rel_err", "rel. err. of dBN/du (aW vs W)", P.THIRD)):
        # at a = 1 both sides are the same computation (difference exactly 0): left out
        ax.plot(a, [r[key] if r[key] > 0 else np.nan for r in inv], "o-", color=c, label=lab)
    ax.plot(a, [r["grad_w_norm_ratio"] for r in inv], "k^", label="||dBN/d(aW)|| / ||dBN/dW||")
    ax.plot(a, [1.0 / x for x in a], "k:", lw=1, label="theory: 1/a")
    P.finish(ax, "weight scale a", "difference / ratio", "Batch norm under a rescaling W -> aW",
             xscale="log", yscale="log", fontsize=7)
    return P.save(fig, path)


def _fig_step(runs: list[dict[str, Any]], path: Path) -> Path:
    fig, axes = P.subplots(1, 2, size=(4.4, 3.4))
    n = min(len(r["steps"]) for r in runs)
    st = np.asarray(runs[0]["steps"][:n])
    cols = [P.PLAIN, P.NORMED, P.THIRD, P.FOURTH, "#ff7f0e", "#8c564b"]
    k = max(1, n // 30)
    for li in range(np.asarray(runs[0]["weight_norm"]).shape[1]):
        c = cols[li % len(cols)]
        P.mean_band(axes[0, 0], st, [np.asarray(r["weight_norm"], float)[:n, li] for r in runs],
                    color=c, label=f"hidden layer {li + 1}")
        sm = [np.convolve(np.asarray(r["update_ratio"], float)[:n, li], np.ones(k) / k,
                          mode="valid") for r in runs]
        P.mean_band(axes[0, 1], st[k - 1:], sm, color=c)
    P.finish(axes[0, 0], "training step", "||W||", "weight norm of the BN-normalised layers")
    P.finish(axes[0, 1], "training step", "||dW|| / ||W|| (moving average)",
             "relative update (effective step)", yscale="log", legend=None)
    P.nice_log_ticks(axes[0, 1], "y")
    return P.save(fig, path)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    out = [_fig_sweep(data["sweep"], float(data["chance_loss"]), d / "lr_sweep.png"),
           _fig_chain(data["chain"], d / "lr_chain.png"),
           _fig_invariance(data["invariance"]["rows"], d / "lr_scale_invariance.png")]
    runs = data["effective_step"]
    runs = [r for r in (runs if isinstance(runs, list) else [runs]) if r["weight_norm"]]
    if runs:
        out.append(_fig_step(runs, d / "lr_effective_step.png"))
    return out
