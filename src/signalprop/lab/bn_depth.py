"""Batch norm's own gradient explosion at initialisation (Yang et al. 2019), and what skips do.

Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz (ICLR 2019) showed that a deep batch-normalised
network without skip connections has gradients that *explode* towards the input at
initialisation: the squared gradient norm grows by a factor lambda_G > 1 per layer, for every
non-constant activation, whatever sigma_w and sigma_b; lambda_G depends on the batch size B
(ReLU: it falls towards pi/(pi - 1) ~ 1.467 as B grows; linear: (B - 2)/(B - 3)). This study
measures the per-layer growth of ||dL/dh^l||^2 in wide random BN networks for several batch sizes
and compares it with :func:`signalprop.theory.bn_gradient_rate`; then it trains BN-ReLU MLPs of
increasing depth with and without residual connections (sweep runner).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import grid as G
from signalprop.lab import plotting as P

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 2
NAME = "bn-depth"
TITLE = "Batch norm's gradient explosion with depth"
QUESTION = (
    "Do gradients explode at initialisation in a deep batch-normalised network without skips, as "
    "mean-field theory predicts, and do skip connections restore trainability at depth?"
)
CLAIM = (
    "In a deep BN network without skip connections the squared gradient norm grows towards the "
    "input by a factor lambda_G(B) > 1 per layer, matching Yang et al. (2019) (ReLU: towards "
    "pi/(pi-1) ~ 1.47 for large batches; linear: (B-2)/(B-3)), smaller batches explode faster, "
    "and such networks train worse as depth grows while residual BN networks do not."
)
SETUP = (
    "Theory vs measurement: wide random MLPs of Linear (no bias) -> BatchNorm1d -> activation "
    "blocks (signalprop.theory.measure_gradient_profile), Gaussian inputs, loss sum(V * x^L) "
    "with random V; the measured rate is the geometric mean of ||dL/dh^l||^2 / ||dL/dh^(l+1)||^2 "
    "over the middle layers (the first few layers, where the batch statistics have not reached "
    "their fixed point, are skipped), averaged over seeds; the prediction is "
    "signalprop.theory.bn_gradient_rate (closed forms for ReLU and linear, quadrature otherwise). "
    "Training: BN-ReLU MLPs (width 64, He init) of increasing depth, with and without residual "
    "connections, plain SGD on scikit-learn digits (sweep runner)."
)
REFERENCES = [
    "Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019, A Mean Field Theory of Batch "
    "Normalization (Theorems 8-9)",
    "He, Zhang, Ren & Sun 2016 (residual networks); De & Smith 2020",
]
CAPTIONS = {
    "bn_rate_vs_batch": "Per-layer growth factor of the squared gradient norm at initialisation vs "
    "batch size: measured in wide random BN networks (dots, bars: 95% t interval over seeds) and "
    "predicted by mean-field theory (lines).",
    "bn_grad_profile": "Squared gradient norm ||dL/dh^l||^2 per layer (log scale) in a deep "
    "random BN-ReLU network for several batch sizes: it grows geometrically towards the input.",
    "bn_training_depth": "Test accuracy after training vs depth, BN-ReLU MLPs with and without "
    "residual connections (mean over seeds; bars: 95% t interval).",
}

#: The measured rate agrees with theory when within this relative error (finite width, finite
#: depth and a single batch make the measurement noisy).
RATE_TOLERANCE = 0.10
MARGIN = 0.05


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {
    "activations": ["relu", "linear"], "batch_sizes": [8, 32], "profile_depth": 12,
    "profile_width": 64, "profile_seeds": [0, 1, 2],
    "train": {"data": "digits", "width": 32, "activation": "relu", "norm": "batch",
              "init": "kaiming", "optimizer": "sgd", "lr": 0.1, "steps": 30, "batch_size": 64},
    "train_depths": [2, 6], "train_seeds": 1,
}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "activations": ["relu", "linear"] if quick else ["relu", "linear", "tanh"],
        "batch_sizes": [4, 8, 16, 32, 64] if quick else [4, 6, 8, 16, 32, 64, 128],
        "profile_depth": 30 if quick else 50,
        "profile_width": 256 if quick else 512,
        "profile_seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
        "train": {
            "data": "digits", "width": 64, "activation": "relu", "norm": "batch",
            "init": "kaiming", "optimizer": "sgd", "lr": 0.1, "steps": 300 if quick else 1000,
            "batch_size": 64,
        },
        "train_depths": [2, 8, 16, 32] if quick else [2, 5, 10, 20, 40, 60],
        "train_seeds": 3 if quick else 5,
        "device": "cpu",
    }


def _profile(config: dict[str, Any], act: str, b: int, seed: int) -> dict[str, Any]:
    from signalprop.theory.torch_adapter import measure_gradient_profile

    p = measure_gradient_profile(
        act, batch_norm=True, depth=config["profile_depth"], width=config["profile_width"],
        batch_size=b, seed=seed, device=config["device"],
    )
    return {"activation": act, "batch_size": b, "seed": seed,
            "measured_rate": p.measured_rate, "predicted_rate": p.predicted_rate,
            "grad_sq_norms": p.grad_sq_norms.tolist(), "rate_layers": list(p.rate_layers)}


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    pkey = {k: config[k] for k in ("profile_depth", "profile_width", "device")}
    profiles = B.cached_cells(workdir, [
        B.Cell({**pkey, "act": a, "b": b, "seed": s}, _profile, (config, a, b, s), tag="profile")
        for a in config["activations"] for b in config["batch_sizes"]
        for s in config["profile_seeds"]
    ], workers=config.get("workers", 1))
    grid = {
        "base": {**config["train"], "record_every": 0, "device": config["device"]},
        "axes": {"depth": list(config["train_depths"]), "residual": [False, True]},
        "seeds": config["train_seeds"],
    }
    rows = G.run_grid(grid, workdir, "training", **G.grid_options(config))
    train = [{k: r.get(k) for k in ("depth", "residual", "seed", "status", "test_accuracy",
                                     "train_loss", "grad_ratio_init")} for r in rows]
    return {"profiles": profiles, "train": train, "activations": config["activations"],
            "batch_sizes": config["batch_sizes"]}


def rate_table(profiles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (activation, batch size): mean/min/max measured rate over seeds and the prediction."""
    out = []
    keys = sorted({(p["activation"], p["batch_size"]) for p in profiles})
    for a, b in keys:
        ps = [p for p in profiles if p["activation"] == a and p["batch_size"] == b]
        m = np.asarray([p["measured_rate"] for p in ps], dtype=float)
        e = E.mean_effect(m)
        out.append({"activation": a, "batch_size": b, "measured": float(np.mean(m)),
                    "lo": e.lo if math.isfinite(e.lo) else float(np.min(m)),
                    "hi": e.hi if math.isfinite(e.hi) else float(np.max(m)),
                    "rates": m.tolist(), "predicted": float(ps[0]["predicted_rate"])})
    return out


def _train_accs(tr: list[dict[str, Any]], d: int, res: bool) -> list[float]:
    """Per-seed test accuracy at depth ``d`` (a failed run counts at chance, 10%)."""
    return [float(r["test_accuracy"]) if r["status"] == "done" and r["test_accuracy"]
            is not None else 0.1 for r in tr if r["depth"] == d and bool(r["residual"]) == res]


def measure(data: dict[str, Any]) -> dict[str, Any]:
    """The numbers: the rate table with a theory check per (activation, batch size), the
    weakest rate against 1, small/large batch rate ratios per activation, and the training
    effects (accuracy drop with depth without skips; residual - plain at the deepest)."""
    table = rate_table(data["profiles"])
    m: dict[str, Any] = {"table": table, "checks": [
        E.theory_check(f"{r['activation']} B={r['batch_size']} rate", r["predicted"],
                       r["measured"], RATE_TOLERANCE,
                       note="finite width/depth" if r["batch_size"] > 32 else "")
        for r in table]}
    if table:
        weakest = min(table, key=lambda r: r["measured"])
        m["explosion"] = E.mean_effect(weakest["rates"], f"rate at {weakest['activation']} "
                                       f"B={weakest['batch_size']} (weakest)", null=1.0)
        m["batch"] = []
        for a in data["activations"]:
            rs = sorted((r for r in table if r["activation"] == a), key=lambda r: r["batch_size"])
            if len(rs) >= 2:
                m["batch"].append(E.log_ratio_effect(
                    rs[0]["rates"], rs[-1]["rates"],
                    f"{a}: rate at B={rs[0]['batch_size']} / at B={rs[-1]['batch_size']}"))
    tr = data["train"]
    depths = sorted({r["depth"] for r in tr})
    if len(depths) >= 2:
        sh, dp = depths[0], depths[-1]
        m["train"] = {
            "shallow": sh, "deep": dp,
            "acc": {(d, res): float(np.mean(_train_accs(tr, d, res)))
                    if _train_accs(tr, d, res) else math.nan
                    for d in (sh, dp) for res in (False, True)},
            "drop": E.diff_effect(_train_accs(tr, sh, False), _train_accs(tr, dp, False),
                                  f"accuracy drop without skips, depth {sh} -> {dp}"),
            "gain": E.diff_effect(_train_accs(tr, dp, True), _train_accs(tr, dp, False),
                                  f"accuracy residual - plain at depth {dp}"),
        }
    return m


def _say_theory(m: dict[str, Any], nums: dict[str, Any]) -> tuple[list[str], list[str]]:
    table, checks, ex = m["table"], m["checks"], m["explosion"]
    for r in table:
        nums[f"{r['activation']} B={r['batch_size']}: measured / predicted rate"] = (
            f"{B.fmt(r['measured'])} / {B.fmt(r['predicted'])}")
    errs = [c.rel_error for c in checks]
    worst, med = max(errs), float(np.median(errs))
    nums["median relative error, measured vs theory"] = med
    nums["largest relative error"] = worst
    nums["theory checks within tolerance"] = f"{sum(c.ok for c in checks)}/{len(checks)}"
    v_ex = E.verdict(ex, +1)
    nums.update(E.numbers(ex))
    v1 = v_ex if med <= RATE_TOLERANCE or v_ex == B.CONTRADICTS else B.INCONCLUSIVE
    if med > 3 * RATE_TOLERANCE:
        v1 = B.CONTRADICTS
    details = [
        f"Measured per-layer growth of the squared gradient norm vs the mean-field prediction: "
        f"median relative error {B.pct(med)} (largest {B.pct(worst)}, tolerance "
        f"{B.pct(RATE_TOLERANCE)}) over {len(table)} (activation, batch size) pairs; "
        f"{E.describe(ex, v_ex)}"
        + ("; NO explosion at the largest batch." if v_ex == B.CONTRADICTS else "."),
        "Theory vs measurement: " + "; ".join(c.text() for c in checks) + "."]
    verdicts = [v1]
    vs = [E.verdict(e, +1) for e in m["batch"]]
    for e, v in zip(m["batch"], vs, strict=True):
        nums.update(E.numbers(e))
        details.append(f"Smaller batches explode faster: {E.describe(e, v)}"
                       + ("; NOT faster." if v == B.CONTRADICTS else "."))
    if vs:
        verdicts.append(B.combine_verdicts(vs))
    return details, verdicts


def _say_training(t: dict[str, Any], nums: dict[str, Any]) -> tuple[str, str]:
    sh, dp, acc = t["shallow"], t["deep"], t["acc"]
    nums[f"test acc, no skips, depth {sh} -> {dp}"] = \
        f"{B.pct(acc[sh, False])} -> {B.pct(acc[dp, False])}"
    nums[f"test acc, residual, depth {sh} -> {dp}"] = \
        f"{B.pct(acc[sh, True])} -> {B.pct(acc[dp, True])}"
    vd, vg = E.verdict(t["drop"], +1), E.verdict(t["gain"], +1)
    nums.update(E.numbers(t["drop"]))
    nums.update(E.numbers(t["gain"]))
    return (f"Training: without skips test accuracy goes from {B.pct(acc[sh, False])} at depth "
            f"{sh} to {B.pct(acc[dp, False])} at depth {dp}; with residual connections from "
            f"{B.pct(acc[sh, True])} to {B.pct(acc[dp, True])}: "
            f"{E.describe(t['drop'], vd, B.pct)}; {E.describe(t['gain'], vg, B.pct)}"
            + (" (depth did NOT hurt the BN network without skips here)."
               if vd == B.CONTRADICTS else "."), B.combine_verdicts([vd, vg]))


def conclude(data: dict[str, Any]) -> B.Conclusion:
    m = measure(data)
    nums: dict[str, Any] = {}
    details: list[str] = []
    verdicts: list[str] = []
    if m["table"]:
        details, verdicts = _say_theory(m, nums)
    if "train" in m:
        d, v = _say_training(m["train"], nums)
        details.append(d)
        verdicts.append(v)
    relu = [r for r in m["table"] if r["activation"] == "relu"]
    head = ""
    if relu:
        head = (f"BN-ReLU gradients explode at initialisation by {B.fmt(relu[0]['measured'])}x "
                f"per layer at B={relu[0]['batch_size']} and {B.fmt(relu[-1]['measured'])}x at "
                f"B={relu[-1]['batch_size']} (theory {B.fmt(relu[0]['predicted'])} and "
                f"{B.fmt(relu[-1]['predicted'])}). ")
    sentence = head + " ".join(d for d in details if not d.startswith("Theory")) \
        if details else "No measurements."
    return B.conclusion(CLAIM, sentence, B.combine_verdicts(verdicts), nums, details)


_COLORS = {"relu": P.PLAIN, "linear": P.NORMED, "tanh": P.THIRD}


def _fig_rates(data: dict[str, Any], path: Path) -> Path:
    table = rate_table(data["profiles"])
    fig, ax = P.panel((5.2, 3.6))
    for a in data["activations"]:
        rs = sorted((r for r in table if r["activation"] == a), key=lambda r: r["batch_size"])
        if not rs:
            continue
        b = [r["batch_size"] for r in rs]
        m = np.asarray([r["measured"] for r in rs])
        ax.errorbar(b, m, yerr=[m - np.asarray([r["lo"] for r in rs]),
                                np.asarray([r["hi"] for r in rs]) - m],
                    fmt="o", color=_COLORS.get(a, P.FOURTH), capsize=3,
                    label=f"{a}: measured (95% CI)")
        ax.plot(b, [r["predicted"] for r in rs], "-", color=_COLORS.get(a, P.FOURTH),
                label=f"{a}: theory")
    if "relu" in data["activations"]:
        ax.axhline(math.pi / (math.pi - 1), color="#555", ls=":", lw=1,
                   label="ReLU limit pi/(pi-1)")
    ax.axhline(1.0, color="k", lw=0.6)
    P.finish(ax, "batch size B", "growth of ||dL/dh||^2 per layer",
             "BN gradient explosion rate at initialisation", xscale="log2")
    return P.save(fig, path)


def _fig_profile(data: dict[str, Any], path: Path) -> Path:
    fig, ax = P.panel((5.2, 3.6))
    act = data["activations"][0]
    rel = [p for p in data["profiles"] if p["activation"] == act
           and p["seed"] == min(q["seed"] for q in data["profiles"])]
    cm = matplotlib_colors(len(rel))
    for c, p in zip(cm, sorted(rel, key=lambda p: p["batch_size"]), strict=True):
        g = np.asarray(p["grad_sq_norms"], dtype=float)
        ax.plot(np.arange(1, len(g) + 1), g / g[-1], "-", color=c, label=f"B = {p['batch_size']}")
    P.finish(ax, "layer l (1 = input side)", "||dL/dh^l||^2 / ||dL/dh^L||^2",
             f"BN-{act} network at initialisation", yscale="log")
    return P.save(fig, path)


def _fig_training(tr: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = P.panel((5.0, 3.5))
    depths = sorted({r["depth"] for r in tr})
    for res, c, lab in ((False, P.PLAIN, "BN-ReLU, no skips"),
                        (True, P.NORMED, "BN-ReLU + residual")):
        P.errorbars(ax, depths, [E.mean_effect(_train_accs(tr, d, res)) for d in depths],
                    color=c, label=f"{lab} (mean, 95% CI)")
    ax.set_ylim(0, 1)
    P.finish(ax, "depth (hidden layers)", "test accuracy after training",
             "Training success vs depth")
    return P.save(fig, path)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    return [_fig_rates(data, d / "bn_rate_vs_batch.png"),
            _fig_profile(data, d / "bn_grad_profile.png"),
            _fig_training(data["train"], d / "bn_training_depth.png")]


def matplotlib_colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]
