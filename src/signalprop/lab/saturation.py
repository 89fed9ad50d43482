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
    pct,
)
from signalprop.lab.common import MLP, get_data, init_linears_, seeded, train_classifier

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 1
NAME = "saturation"
TITLE = "Batch norm and sigmoid saturation"
QUESTION = (
    "Does batch norm stop sigmoid saturation, keep the input distribution of each layer stable, "
    "and so make a sigmoid network train faster?"
)
CLAIM = (
    "With batch norm before each sigmoid, fewer units saturate, the distribution of a sigmoid's "
    "input stays stable during training instead of drifting, and the network reaches a given "
    "test accuracy sooner (Ioffe & Szegedy 2015, Figure 1); with BN's shift frozen at 0, ReLU "
    "units cannot die."
)
SETUP = (
    "MLP with 3 hidden layers of 100 sigmoid units (weights N(0, 1/fan_in), zero biases), "
    "softmax + cross-entropy, plain SGD on mini-batches of 60; the same network with BatchNorm1d "
    "before every sigmoid. Data: scikit-learn digits (and MNIST-1D in the full run). Every few "
    "steps a fixed probe batch of training examples is passed through the network (BN statistics "
    "of the batch, running statistics untouched) to read the pre-activation percentiles and the "
    "saturated fraction per layer. ReLU part: the same shape with ReLU units and BN, beta "
    "learnable vs frozen at 0, at a large learning rate (3.0)."
)
REFERENCES = [
    "Ioffe & Szegedy 2015, Batch Normalization (Figure 1)",
    "Glorot & Bengio 2010 (saturation of sigmoid units)",
]
CAPTIONS = {
    "saturation_accuracy": "Test accuracy vs training step, with and without batch norm "
    "(mean over seeds; shaded: min-max).",
    "saturation_percentiles": "15th, 50th and 85th percentiles of the input of one sigmoid in the "
    "last hidden layer over training, on a fixed probe batch (cf. Ioffe & Szegedy 2015, Fig. 1b/c).",
    "saturation_fraction": "Saturated fraction (|sigmoid'(z)| < 0.1 x max) per hidden layer over "
    "training, with and without batch norm.",
    "saturation_dead_relu": "Dead ReLU units (inactive for the whole probe batch) in a BN-ReLU "
    "network, BN's beta learnable vs frozen at 0.",
}

#: Claims are decided with these margins (relative differences below them are "too close").
MARGIN = 0.10


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {"steps": 120, "relu_steps": 60, "record_every": 20, "seeds": [0],
                         "width": 32, "probe_batch": 128}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "datasets": ["digits"] if quick else ["digits", "mnist1d"],
        "width": 100,
        "depth": 3,
        "steps": 1500 if quick else 6000,
        "batch_size": 60,
        "lr": 0.5,
        "init_scale": 1.0,
        "seeds": [0, 1] if quick else [0, 1, 2],
        "record_every": 50 if quick else 200,
        "probe_batch": 512,
        "unit": 0,
        "relu_lr": 3.0,  # large but still trainable: where dying units show up
        "relu_steps": 1000 if quick else 4000,
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
    config: dict[str, Any], dataset: str, variant: str, seed: int, relu: bool
) -> dict[str, Any]:
    data = get_data(dataset, config["device"])
    g = seeded(seed)
    norm = "bn" if variant != "plain" else "none"
    model = MLP(data.in_features, data.num_classes, config["width"], config["depth"],
                activation="relu" if relu else "sigmoid", norm=norm)
    init_linears_(model.linears(), "gaussian", config["init_scale"], generator=g)
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
        "dataset": dataset, "variant": variant, "seed": seed, "relu": relu,
        "eval_steps": r.eval_steps, "test_acc": r.test_acc, "final_test_acc": r.final_test_acc,
        "diverged": r.diverged, "probe_steps": rec_steps, "wall_s": r.wall_s,
    }
    if relu:
        out["dead"] = [p["dead"] for p in probes]  # [T][L]
    else:
        out["saturated"] = [p["saturated"] for p in probes]  # [T][L]
        out["last_pcts"] = [p["last_pcts"] for p in probes]  # [T][units][3]
    return out


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    base = {k: v for k, v in config.items() if k not in ("datasets", "seeds", "executor")}
    runs = []
    for ds in config["datasets"]:
        for variant in ("plain", "bn"):
            for s in config["seeds"]:
                key = {**base, "dataset": ds, "variant": variant, "seed": s, "relu": False}
                runs.append(cached(workdir, key, lambda ds=ds, v=variant, s=s: _train_one(
                    config, ds, v, s, relu=False), tag="sig"))
    relu_runs = []
    ds0 = config["datasets"][0]
    for variant in ("bn", "bn-frozen-beta"):
        for s in config["seeds"]:
            key = {**base, "dataset": ds0, "variant": variant, "seed": s, "relu": True}
            relu_runs.append(cached(workdir, key, lambda v=variant, s=s: _train_one(
                config, ds0, v, s, relu=True), tag="relu"))
    return {"runs": runs, "relu_runs": relu_runs, "unit": config["unit"],
            "datasets": config["datasets"]}


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


def _summ(runs: list[dict[str, Any]], variant: str, dataset: str) -> dict[str, float]:
    rs = [r for r in runs if r["variant"] == variant and r["dataset"] == dataset]
    if not rs:
        return {}
    sat = []
    for r in rs:
        a = np.asarray(r["saturated"], dtype=float)  # [T, L]
        half = a[a.shape[0] // 2 :]  # second half of training: where drift would have led
        sat.append(float(np.nanmean(half)))
    accs = [np.asarray(r["test_acc"], dtype=float) for r in rs]
    n = min(len(a) for a in accs)
    mean_curve = np.nanmean(np.stack([a[:n] for a in accs]), axis=0)
    return {
        "saturated": float(np.mean(sat)),
        "saturated_max_layer": float(np.mean([np.nanmax(np.mean(np.asarray(r["saturated"],
                                     dtype=float), axis=0)) for r in rs])),
        "drift": float(np.nanmean([drift(r["last_pcts"]) for r in rs])),
        "final_acc": float(np.nanmean([r["final_test_acc"] for r in rs])),
        # area under the accuracy curve = mean accuracy over the recordings: "trains faster"
        "mean_acc": float(np.nanmean(mean_curve)),
    }


def _ratio_verdict(better: float, worse: float, lower_is_better: bool = True) -> str:
    if not (np.isfinite(better) and np.isfinite(worse)):
        return INCONCLUSIVE
    if lower_is_better:
        if better < worse * (1 - MARGIN):
            return SUPPORTS
        if better > worse * (1 + MARGIN):
            return CONTRADICTS
        return INCONCLUSIVE
    if better > worse * (1 + MARGIN / 4):
        return SUPPORTS
    if better < worse * (1 - MARGIN / 4):
        return CONTRADICTS
    return INCONCLUSIVE


def conclude(data: dict[str, Any]) -> Conclusion:
    nums: dict[str, Any] = {}
    verdicts: list[str] = []
    details: list[str] = []
    for ds in data["datasets"]:
        p, b = _summ(data["runs"], "plain", ds), _summ(data["runs"], "bn", ds)
        if not p or not b:
            continue
        for k in ("saturated", "drift", "mean_acc", "final_acc"):
            nums[f"{ds}: {k} plain"] = p[k]
            nums[f"{ds}: {k} BN"] = b[k]
        # 1) saturation
        if p["saturated"] < 0.01 and b["saturated"] < 0.01:
            v1 = INCONCLUSIVE
            details.append(
                f"{ds}: the plain sigmoid network barely saturated ({pct(p['saturated'])} of "
                f"units, second half of training), so there was little saturation for BN to stop "
                f"(BN: {pct(b['saturated'])})."
            )
        else:
            v1 = _ratio_verdict(b["saturated"], p["saturated"])
            word = {SUPPORTS: "fewer", CONTRADICTS: "MORE", INCONCLUSIVE: "about as many"}[v1]
            details.append(
                f"{ds}: with BN {word} units saturated: {pct(b['saturated'])} vs "
                f"{pct(p['saturated'])} without (mean over layers, second half of training)."
            )
        # 2) stability of the input distribution
        v2 = _ratio_verdict(b["drift"], p["drift"])
        details.append(
            f"{ds}: the median input of a last-layer sigmoid travelled {fmt(b['drift'])} "
            f"distribution widths with BN vs {fmt(p['drift'])} without"
            + (" (BN is NOT more stable here)." if v2 == CONTRADICTS else ".")
        )
        # 3) speed
        v3 = _ratio_verdict(b["mean_acc"], p["mean_acc"], lower_is_better=False)
        details.append(
            f"{ds}: mean test accuracy over training {pct(b['mean_acc'])} with BN vs "
            f"{pct(p['mean_acc'])} without (final {pct(b['final_acc'])} vs "
            f"{pct(p['final_acc'])})" + (": BN did NOT train faster." if v3 == CONTRADICTS else ".")
        )
        verdicts += [v1, v2, v3]
    # 4) dead ReLUs with beta learnable vs frozen
    rr = data.get("relu_runs", [])
    if rr:
        def dead_of(variant: str) -> float:
            xs = [np.nanmax(np.asarray(r["dead"], dtype=float)) for r in rr
                  if r["variant"] == variant]
            return float(np.mean(xs)) if xs else float("nan")

        d_learn, d_frozen = dead_of("bn"), dead_of("bn-frozen-beta")
        nums["BN-ReLU max dead fraction, beta learnable"] = d_learn
        nums["BN-ReLU max dead fraction, beta frozen at 0"] = d_frozen
        if d_frozen <= 0.01:
            v4 = SUPPORTS
            details.append(
                f"BN-ReLU: with beta frozen at 0 at most {pct(d_frozen)} of units were dead; with "
                f"a learnable beta {pct(d_learn)}."
            )
        else:
            v4 = CONTRADICTS
            details.append(
                f"BN-ReLU: even with beta frozen at 0, up to {pct(d_frozen)} of units died "
                f"(learnable beta: {pct(d_learn)}), contrary to the claim."
            )
        verdicts.append(v4)
    verdict = combine_verdicts(verdicts)
    ds0 = data["datasets"][0]
    p, b = _summ(data["runs"], "plain", ds0), _summ(data["runs"], "bn", ds0)
    head = {
        SUPPORTS: "Batch norm behaved as claimed",
        CONTRADICTS: "The measurements contradict part of the claim",
        INCONCLUSIVE: "The measurements only partly settle the claim",
    }[verdict]
    sentence = (
        f"{head}: on {ds0}, saturated fraction {pct(b.get('saturated'))} with BN vs "
        f"{pct(p.get('saturated'))} without, input drift {fmt(b.get('drift'))} vs "
        f"{fmt(p.get('drift'))} widths, mean test accuracy over training {pct(b.get('mean_acc'))} "
        f"vs {pct(p.get('mean_acc'))}."
    )
    contra = [d for d in details if "NOT" in d or "MORE" in d or "contrary" in d]
    if contra:
        sentence += " Contradicted: " + " ".join(contra)
    return conclusion(CLAIM, sentence, verdict, nums, details)


def _band(ax: Any, runs: list[dict[str, Any]], key_x: str, key_y: str, color: str, label: str):
    ys = [np.asarray(r[key_y], dtype=float) for r in runs]
    n = min(len(y) for y in ys)
    x = np.asarray(runs[0][key_x][:n])
    y = np.stack([v[:n] for v in ys])
    ax.plot(x, y.mean(0), color=color, label=label)
    if len(runs) > 1:
        ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.2, lw=0)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    out = []
    d = P.figdir(workdir)
    dss = data["datasets"]
    runs = data["runs"]
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
            a = np.stack([np.asarray(r["dead"], dtype=float).max(1) for r in rs])  # [S, T]
            x = rs[0]["probe_steps"][: a.shape[1]]
            ax.plot(x, a.mean(0), color=color, label=lab)
            ax.fill_between(x, a.min(0), a.max(0), color=color, alpha=0.2, lw=0)
        ax.set_xlabel("training step")
        ax.set_ylabel("dead fraction (worst hidden layer)")
        ax.set_title(f"{data['datasets'][0]}: 3 x 100 BN-ReLU MLP")
        ax.legend(loc="best")
        out.append(P.save(fig, d / "saturation_dead_relu.png"))
    return out
