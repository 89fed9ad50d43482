"""Does batch norm stop sigmoid saturation? (the analogue of Ioffe & Szegedy 2015, Figure 1)

Three hidden layers of 100 sigmoid units, small random Gaussian initialisation, mini-batches of 60,
trained with and without batch norm before each sigmoid on real data (scikit-learn digits; MNIST-1D
as well in the full configuration). Measured over training: test accuracy; the 15th/50th/85th
percentiles of the input of one last-layer sigmoid (on a fixed probe batch); the saturated
fraction of every layer (units whose |sigmoid'(z)| is below 10% of its maximum, i.e. |z| > 3.6).
A ReLU + BN network is trained as well, with BN's shift beta learnable vs frozen at 0, recording
the fraction of dead units (inactive for every example of the probe batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from signalprop import stats
from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import plotting as P
from signalprop.lab.common import MLP, get_data, init_linears_, seeded, train_classifier

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 2
NAME = "saturation"
TITLE = "Batch norm and sigmoid saturation"
QUESTION = (
    "Does batch norm stop sigmoid saturation, keep the input distribution of each layer stable, "
    "and so make a sigmoid network train faster?"
)
CLAIM = (
    "With batch norm before each sigmoid, fewer units saturate, the distribution of a sigmoid's "
    "input stays stable during training instead of drifting, and the network reaches a given "
    "test accuracy sooner (Ioffe & Szegedy 2015, Figure 1); in a BN-ReLU network a learnable "
    "shift (beta) lets the network keep fewer than the half of its units off per example that "
    "beta = 0 forces."
)
SETUP = (
    "MLP with 3 hidden layers of 100 sigmoid units (weights N(0, s^2/fan_in) with s = 3 so that "
    "the plain network does saturate; zero biases), "
    "softmax + cross-entropy, plain SGD on mini-batches of 60; the same network with BatchNorm1d "
    "before every sigmoid. Data: scikit-learn digits (and MNIST-1D in the full run). Every few "
    "steps a fixed probe batch of training examples is passed through the network (BN statistics "
    "of the batch, running statistics untouched) to read the pre-activation percentiles and the "
    "saturated fraction per layer. Metrics and intervals (Welch, over 3 seeds quick / 5 full): "
    "saturated fraction in the second half of training, drift of a last-layer sigmoid's median "
    "input in units of its 15-85 spread (ratio, on the logs), mean test accuracy over training "
    "(a speed measure: budget fixed, both at the same SGD rate 0.5, the rate of the Ioffe & "
    "Szegedy analogue). ReLU part: the same shape with ReLU units and BN, beta learnable vs "
    "frozen at 0, at a large learning rate (3.0): the fraction of units off (output 0) per "
    "example, averaged over examples and units (not 'dead over the whole batch', which beta = 0 "
    "rules out by construction), and the final test accuracy."
)
REFERENCES = [
    "Ioffe & Szegedy 2015, Batch Normalization (Figure 1)",
    "Glorot & Bengio 2010 (saturation of sigmoid units)",
]
CAPTIONS = {
    "saturation_accuracy": "Test accuracy vs training step, with and without batch norm "
    "(mean over seeds; shaded: 95% t interval).",
    "saturation_percentiles": "15th, 50th and 85th percentiles of the input of one sigmoid in the "
    "last hidden layer over training, on a fixed probe batch (cf. Ioffe & Szegedy 2015, Fig. 1b/c).",
    "saturation_fraction": "Saturated fraction (|sigmoid'(z)| < 0.1 x max) per hidden layer over "
    "training, with and without batch norm.",
    "saturation_dead_relu": "Fraction of ReLU units off per example (mean over the probe batch "
    "and the hidden layers) in a BN-ReLU network, BN's beta learnable vs frozen at 0 (mean over "
    "seeds, 95% interval).",
}

#: Claims are decided with these margins (relative differences below them are "too close").
MARGIN = 0.10


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {"steps": 120, "relu_steps": 60, "record_every": 20, "seeds": [0, 1, 2],
                         "width": 32, "probe_batch": 128, "init_scales": [3.0]}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "datasets": ["digits"] if quick else ["digits", "mnist1d"],
        "width": 100,
        "depth": 3,
        "steps": 1000 if quick else 6000,
        "batch_size": 60,
        "lr": 0.5,
        "init_scale": 1.0,
        "init_scales": [3.0],
        "seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
        "record_every": 50 if quick else 200,
        "probe_batch": 512,
        "unit": 0,
        "relu_lr": 3.0,  # large but still trainable: where dying units show up
        "relu_steps": 600 if quick else 4000,
        "device": "cpu",
    }


@torch.no_grad()
def _probe(model: MLP, xp: torch.Tensor, relu: bool) -> dict[str, Any]:
    """Pass the probe batch in train mode (batch statistics) without touching running stats."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    model.set_capture(True)
    model(xp)
    out: dict[str, Any] = {}
    pre = torch.stack([b.preact for b in model.blocks])  # [L, B, units]
    post = torch.stack([b.post for b in model.blocks])
    if relu:
        out["dead"] = stats.dead_fraction(post).tolist()
        out["off"] = (post == 0).float().mean(dim=(1, 2)).tolist()  # per example, per layer
    else:
        out["saturated"] = stats.saturated_fraction(post, "sigmoid").tolist()
        last = pre[-1]  # [B, units]: percentiles of every unit of the last layer
        q = stats.percentiles(last.T.contiguous(), (15.0, 50.0, 85.0), max_samples=None)
        out["last_pcts"] = q.tolist()  # [units, 3]
    model.set_capture(False)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    return out


def _train_one(
    config: dict[str, Any], dataset: str, variant: str, seed: int, relu: bool,
    scale: float | None = None,
) -> dict[str, Any]:
    data = get_data(dataset, config["device"])
    g = seeded(seed)
    norm = "bn" if variant != "plain" else "none"
    model = MLP(data.in_features, data.num_classes, config["width"], config["depth"],
                activation="relu" if relu else "sigmoid", norm=norm)
    scale = float(config["init_scale"] if scale is None else scale)
    init_linears_(model.linears(), "gaussian", 1.0 if relu else scale, generator=g)
    if variant == "bn-frozen-beta":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.bias.requires_grad_(False)
                m.bias.zero_()
    model.to(config["device"])
    pg = torch.Generator().manual_seed(10_000 + seed)
    probe_idx = torch.randperm(data.x_train.shape[0], generator=pg)[: config["probe_batch"]]
    xp = data.x_train[probe_idx.to(data.x_train.device)]
    rec_steps: list[int] = []
    probes: list[dict[str, Any]] = []

    def cb(step: int, m: nn.Module, loss: float, res: Any) -> None:
        if step % config["record_every"] == 0:
            rec_steps.append(step)
            probes.append(_probe(model, xp, relu))

    steps = config["relu_steps"] if relu else config["steps"]
    r = train_classifier(
        model, data, steps=steps, batch_size=config["batch_size"], optimizer="sgd",
        lr=config["relu_lr"] if relu else config["lr"], seed=seed,
        eval_every=config["record_every"], log_every=config["record_every"], callback=cb,
    )
    rec_steps.append(r.steps_done)
    probes.append(_probe(model, xp, relu))
    out = {
        "dataset": dataset, "variant": variant, "seed": seed, "relu": relu, "scale": scale,
        "eval_steps": r.eval_steps, "test_acc": r.test_acc, "final_test_acc": r.final_test_acc,
        "diverged": r.diverged, "probe_steps": rec_steps, "wall_s": r.wall_s,
    }
    if relu:
        out["dead"] = [p["dead"] for p in probes]  # [T][L]
        out["off"] = [p["off"] for p in probes]  # [T][L]
    else:
        out["saturated"] = [p["saturated"] for p in probes]  # [T][L]
        out["last_pcts"] = [p["last_pcts"] for p in probes]  # [T][units][3]
    return out


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    base = {k: v for k, v in config.items()
            if k not in ("datasets", "seeds", "executor", "init_scales")}
    runs = []
    for ds in config["datasets"]:
        for sc in config.get("init_scales", [config["init_scale"]]):
            for variant in ("plain", "bn"):
                for s in config["seeds"]:
                    key = {**base, "dataset": ds, "variant": variant, "seed": s, "relu": False,
                           "scale": sc}
                    runs.append(B.cached(workdir, key, lambda ds=ds, v=variant, s=s, sc=sc:
                                       _train_one(config, ds, v, s, relu=False, scale=sc),
                                       tag="sig"))
    relu_runs = []
    ds0 = config["datasets"][0]
    for variant in ("bn", "bn-frozen-beta"):
        for s in config["seeds"]:
            key = {**base, "dataset": ds0, "variant": variant, "seed": s, "relu": True}
            relu_runs.append(B.cached(workdir, key, lambda v=variant, s=s: _train_one(
                config, ds0, v, s, relu=True), tag="relu"))
    return {"runs": runs, "relu_runs": relu_runs, "unit": config["unit"],
            "datasets": config["datasets"],
            "init_scales": config.get("init_scales", [config["init_scale"]])}


# --- summaries --------------------------------------------------------------------------------
def drift(last_pcts: list) -> float:
    """How far the input distribution of last-layer sigmoids wanders during training, in units of
    its own width: path length of the median over training divided by the mean 15-85 spread,
    averaged over the units of the layer.

    Args:
        last_pcts: [T][units][3] percentiles (15, 50, 85) at T recording steps.
    """
    a = np.asarray(last_pcts, dtype=float)  # [T, U, 3]
    if a.ndim != 3 or a.shape[0] < 2:
        return float("nan")
    path = np.abs(np.diff(a[:, :, 1], axis=0)).sum(axis=0)  # [U]
    width = (a[:, :, 2] - a[:, :, 0]).mean(axis=0)  # [U]
    return float(np.nanmean(path / np.maximum(width, 1e-12)))


def _sel(runs: list[dict[str, Any]], variant: str, dataset: str,
         scale: float | None) -> list[dict[str, Any]]:
    return [r for r in runs if r["variant"] == variant and r["dataset"] == dataset
            and (scale is None or r.get("scale", scale) == scale)]


def per_seed(runs: list[dict[str, Any]], variant: str, dataset: str,
             scale: float | None = None) -> dict[str, list[float]]:
    """Per-seed summaries: saturated fraction (second half of training), drift, mean and final
    test accuracy."""
    out: dict[str, list[float]] = {"saturated": [], "drift": [], "mean_acc": [], "final_acc": []}
    for r in _sel(runs, variant, dataset, scale):
        a = np.asarray(r["saturated"], dtype=float)  # [T, L]
        out["saturated"].append(float(np.nanmean(a[a.shape[0] // 2:])))
        out["drift"].append(drift(r["last_pcts"]))
        # area under the accuracy curve = mean accuracy over the recordings: "trains faster"
        out["mean_acc"].append(float(np.nanmean(np.asarray(r["test_acc"], dtype=float))))
        out["final_acc"].append(float(r["final_test_acc"]))
    return out


def conclude(data: dict[str, Any]) -> B.Conclusion:
    nums: dict[str, Any] = {}
    verdicts: list[str] = []
    details: list[str] = []
    scales = data.get("init_scales") or [None]
    for ds in data["datasets"]:
        for sc in scales:
            p, b = per_seed(data["runs"], "plain", ds, sc), per_seed(data["runs"], "bn", ds, sc)
            if not p["saturated"] or not b["saturated"]:
                continue
            tag = f"{ds}" + (f", init x{B.fmt(sc)}" if sc is not None else "")
            for k in ("saturated", "drift", "mean_acc", "final_acc"):
                nums[f"{tag}: {k} plain"] = float(np.mean(p[k]))
                nums[f"{tag}: {k} BN"] = float(np.mean(b[k]))
            # 1) saturation
            e1 = E.diff_effect(b["saturated"], p["saturated"], f"{tag}: saturated BN - plain")
            if max(np.mean(p["saturated"]), np.mean(b["saturated"])) < 0.01:
                v1 = B.INCONCLUSIVE
                details.append(
                    f"{tag}: the plain sigmoid network barely saturated "
                    f"({B.pct(float(np.mean(p['saturated'])))} of units, second half of training), "
                    "so there was little saturation for BN to stop.")
            else:
                v1 = E.verdict(e1, -1)
                details.append(
                    f"{tag}: saturated fraction {B.pct(float(np.mean(b['saturated'])))} with BN vs "
                    f"{B.pct(float(np.mean(p['saturated'])))} without; {E.describe(e1, v1, B.pct)}"
                    + (" (BN did NOT reduce saturation)." if v1 == B.CONTRADICTS else "."))
            # 2) stability of the input distribution
            e2 = E.log_ratio_effect(b["drift"], p["drift"], f"{tag}: drift BN / plain")
            v2 = E.verdict(e2, -1)
            details.append(
                f"{tag}: the median input of a last-layer sigmoid travelled "
                f"{B.fmt(float(np.mean(b['drift'])))} widths with BN vs "
                f"{B.fmt(float(np.mean(p['drift'])))} without; {E.describe(e2, v2)}"
                + (" (BN is NOT more stable here)." if v2 == B.CONTRADICTS else "."))
            # 3) speed
            e3 = E.diff_effect(b["mean_acc"], p["mean_acc"],
                               f"{tag}: mean test accuracy over training BN - plain")
            v3 = E.verdict(e3, +1)
            details.append(
                f"{E.describe(e3, v3, B.pct)} (final {B.pct(float(np.mean(b['final_acc'])))} "
                f"vs {B.pct(float(np.mean(p['final_acc'])))})"
                + ("; BN did NOT train faster." if v3 == B.CONTRADICTS else "."))
            for e in (e1, e2, e3):
                nums.update(E.numbers(e))
            verdicts += [v1, v2, v3]
    # 4) ReLU units off per example, beta learnable vs frozen at 0
    rr = data.get("relu_runs", [])
    if rr and all("off" in r for r in rr):
        def off_of(variant: str) -> list[float]:
            return [float(np.nanmean(np.asarray(r["off"], dtype=float)[-1]))
                    for r in rr if r["variant"] == variant]

        def acc_of(variant: str) -> list[float]:
            return [float(r["final_test_acc"]) for r in rr if r["variant"] == variant]

        e4 = E.diff_effect(off_of("bn"), off_of("bn-frozen-beta"),
                           "ReLU units off per example, beta learnable - frozen")
        v4 = E.verdict(e4, -1)
        ea = E.diff_effect(acc_of("bn"), acc_of("bn-frozen-beta"),
                           "BN-ReLU test accuracy, beta learnable - frozen")
        nums.update(E.numbers(e4))
        nums.update(E.numbers(ea))
        nums["BN-ReLU off fraction, beta frozen at 0"] = float(np.mean(off_of("bn-frozen-beta")))
        nums["BN-ReLU off fraction, beta learnable"] = float(np.mean(off_of("bn")))
        details.append(
            f"BN-ReLU at the end of training: {B.pct(float(np.mean(off_of('bn-frozen-beta'))))} of "
            f"units off per example with beta frozen at 0 vs "
            f"{B.pct(float(np.mean(off_of('bn'))))} with a learnable beta; "
            f"{E.describe(e4, v4, B.pct)}; {E.describe(ea, E.verdict(ea, +1), B.pct)}"
            + (" (a learnable beta did NOT lower the off fraction)." if v4 == B.CONTRADICTS
               else "."))
        verdicts.append(v4)
    verdict = B.combine_verdicts(verdicts)
    head = {
        B.SUPPORTS: "Batch norm behaved as claimed",
        B.CONTRADICTS: "The measurements contradict part of the claim",
        B.INCONCLUSIVE: "The measurements only partly settle the claim",
    }[verdict]
    sentence = f"{head}. " + " ".join(details)
    return B.conclusion(CLAIM, sentence, verdict, nums, details)


def _band(ax: Any, runs: list[dict[str, Any]], key_x: str, key_y: str, color: str, label: str):
    n = min(len(r[key_y]) for r in runs)
    P.mean_band(ax, runs[0][key_x][:n], [r[key_y][:n] for r in runs], color=color, label=label)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    out = []
    d = P.figdir(workdir)
    dss = data["datasets"]
    sc0 = (data.get("init_scales") or [None])[0]
    runs = [r for r in data["runs"] if sc0 is None or r.get("scale", sc0) == sc0]
    # accuracy
    fig, axes = P.subplots(1, len(dss), size=(4.6, 3.4))
    for ax, ds in zip(axes[0], dss, strict=True):
        for variant, color, lab in (("plain", P.PLAIN, "sigmoid"), ("bn", P.NORMED, "BN + sigmoid")):
            rs = [r for r in runs if r["dataset"] == ds and r["variant"] == variant]
            if rs:
                _band(ax, rs, "eval_steps", "test_acc", color, lab)
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{ds}: 3 x 100 sigmoid MLP")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right")
    out.append(P.save(fig, d / "saturation_accuracy.png"))
    # percentiles of one unit
    unit = int(data["unit"])
    fig, axes = P.subplots(1, 2, size=(4.4, 3.4), sharey=False)
    for ax, variant, title in ((axes[0, 0], "plain", "without BN"), (axes[0, 1], "bn", "with BN")):
        rs = [r for r in runs if r["dataset"] == dss[0] and r["variant"] == variant]
        if not rs:
            continue
        r = rs[0]
        a = np.asarray(r["last_pcts"], dtype=float)[:, unit, :]  # [T, 3]
        x = r["probe_steps"][: a.shape[0]]
        for j, (q, ls) in enumerate(((15, ":"), (50, "-"), (85, "--"))):
            ax.plot(x, a[:, j], ls=ls, color=P.PLAIN if variant == "plain" else P.NORMED,
                    label=f"{q}th percentile")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"input of sigmoid unit {unit}, last hidden layer")
        ax.set_title(f"{dss[0]}: {title}")
        ax.legend(loc="best")
    out.append(P.save(fig, d / "saturation_percentiles.png"))
    # saturated fraction per layer
    fig, axes = P.subplots(1, 2, size=(4.4, 3.4), sharey=True)
    cmap = ["#fdae61", "#f46d43", "#a50026", "#67001f", "#40004b"]
    for ax, variant, title in ((axes[0, 0], "plain", "without BN"), (axes[0, 1], "bn", "with BN")):
        rs = [r for r in runs if r["dataset"] == dss[0] and r["variant"] == variant]
        if not rs:
            continue
        a = np.mean([np.asarray(r["saturated"], dtype=float) for r in rs], axis=0)  # [T, L]
        x = rs[0]["probe_steps"][: a.shape[0]]
        for li in range(a.shape[1]):
            ax.plot(x, a[:, li], color=cmap[li % len(cmap)], label=f"hidden layer {li + 1}")
        ax.set_xlabel("training step")
        ax.set_ylabel("saturated fraction")
        ax.set_title(f"{dss[0]}: {title}")
        ax.legend(loc="best")
    top = max(0.05, 1.15 * max(ax.get_ylim()[1] for ax in axes[0]))
    for ax in axes[0]:
        ax.set_ylim(0, min(1.0, top))
    out.append(P.save(fig, d / "saturation_fraction.png"))
    # dead relu
    rr = data.get("relu_runs", [])
    if rr:
        fig, axes = P.subplots(1, 1, size=(5.0, 3.4))
        ax = axes[0, 0]
        for variant, color, lab in (("bn", P.PLAIN, "BN, beta learnable"),
                                    ("bn-frozen-beta", P.NORMED, "BN, beta frozen at 0")):
            rs = [r for r in rr if r["variant"] == variant]
            if not rs:
                continue
            if not all("off" in r for r in rs):
                continue
            n = min(len(r["off"]) for r in rs)
            P.mean_band(ax, rs[0]["probe_steps"][:n],
                        [np.asarray(r["off"], dtype=float)[:n].mean(1) for r in rs],
                        color=color, label=lab)
        ax.set_xlabel("training step")
        ax.set_ylabel("fraction of units off per example")
        ax.set_title(f"{data['datasets'][0]}: 3 x 100 BN-ReLU MLP")
        ax.legend(loc="best")
        out.append(P.save(fig, d / "saturation_dead_relu.png"))
    return out
