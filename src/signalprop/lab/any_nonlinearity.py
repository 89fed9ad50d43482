"""Keeping sigmoid, tanh, Gaussian, RBF and softplus networks trainable without ReLU or BN.

A grid of {activation} x {remedy} at two depths, with a ReLU baseline: test accuracy after a fixed
budget of steps, and the ratio of the first layer's gradient norm to the output layer's at
initialisation (<< 1: vanishing towards the input; >> 1: exploding). Dot-product activations run
through the sweep runner (batched populations); the RBF network (every hidden layer an RBF layer,
unit j = exp(-||x - c_j||^2 / (2 s_j^2))) and the layer-wise learning-rate column use the remedies
cabinet on ``nn.Module`` models with the lab's training loop.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from signalprop.lab import plotting as P
from signalprop.lab.base import (
    CONTRADICTS,
    INCONCLUSIVE,
    SUPPORTS,
    Conclusion,
    cached,
    combine_verdicts,
    conclusion,
    pct,
)
from signalprop.lab.common import get_data, make_activation, seeded, train_classifier
from signalprop.lab.grid import grid_options, run_grid

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 1
NAME = "any-nonlinearity"
TITLE = "Any non-linearity can be trained at depth"
QUESTION = (
    "How do I keep sigmoid, tanh, Gaussian, RBF or softplus networks trainable at depth without "
    "switching to ReLU or adding batch norm?"
)
CLAIM = (
    "Deep networks with saturating or bump-shaped non-linearities fail to train with a default "
    "set-up, but each can be made trainable at depth by a suitable remedy other than ReLU/BN "
    "(critical or orthogonal initialisation, LSUV, a scaled activation, layer norm, residual "
    "connections, or a scale-free optimiser)."
)
SETUP = (
    "MLPs of width 32 on scikit-learn digits, at two depths, trained for a fixed budget of SGD "
    "steps (batch 64; each SGD cell at lr 0.1 and 0.01, the better one kept) from the 'none' "
    "set-up: weights N(0, 1/(3 fan_in)) (the variance "
    "of PyTorch's default initialisation), zero biases. Each remedy changes one thing: xavier, "
    "orthogonal (Saxe et al.), critical (edge of chaos, sigma_w and sigma_b from "
    "signalprop.theory.critical_point at sigma_b^2 = 0; none exists for softplus), lsuv (Mishkin "
    "& Matas), scaled (a*phi with the NF gain a = 1/std(phi(z)) and weights N(0, 1/fan_in)), bn "
    "and ln (before the activation), residual (h + block(h)), and the optimisers RMSProp (1e-3), "
    "Rprop (1e-2), SMORMS3 (1e-3), Adam (1e-3) and layer-wise rates (LARS trust ratio, "
    "signalprop.remedies 'layerwise_lr'). The RBF row stacks RBF layers (norms act on the "
    "distance pre-activation); dot-product initialisations do not apply to it (n/a). "
    "'Trainable' means at least 80% test accuracy after the step budget; a ReLU network with He "
    "initialisation is shown as the reference."
)
REFERENCES = [
    "Schoenholz et al. 2017 (critical initialisation); Saxe et al. 2013 (orthogonal)",
    "Mishkin & Matas 2016 (LSUV); Brock, De & Smith 2021 (scaled activations / NF gains)",
    "Ba, Kiros & Hinton 2016 (layer norm); He et al. 2016 (residual)",
    "Riedmiller & Braun 1993 (Rprop); Funk 2015 (SMORMS3); You et al. 2017 (LARS)",
]
CAPTIONS = {
    "anynl_accuracy": "Test accuracy after training, per activation (rows) and remedy (columns), "
    "at each depth (SGD cells: the better of the two learning rates); grey: not applicable.",
    "anynl_grad_ratio": "First-layer over output-layer gradient norm at initialisation (log "
    "colour scale; << 1 vanishing, >> 1 exploding); grey: not applicable or zero.",
}

ACTIVATIONS = ["sigmoid", "tanh", "gaussian", "rbf", "softplus"]
REMEDIES = ["none", "xavier", "orthogonal", "critical", "lsuv", "scaled", "bn", "ln", "residual",
            "rmsprop", "rprop", "smorms3", "adam", "layerwise"]
#: learning rates of the optimiser remedies (their usual defaults)
OPT_LR = {"rmsprop": 1e-3, "rprop": 1e-2, "smorms3": 1e-3, "adam": 1e-3}
#: remedies that do not apply to a stack of RBF layers (they initialise dot-product weights)
RBF_NA = {"xavier", "orthogonal", "critical", "lsuv", "scaled"}
DEFAULT_SCALE = 1 / math.sqrt(3)  # PyTorch's default Linear init has Var W = 1/(3 fan_in)
#: "Trainable": test accuracy of at least this much after the step budget (a well-trained MLP
#: reaches ~95% on digits; chance is 10%). An absolute bar, because the ReLU reference itself can
#: fail at depth within a fixed budget.
SUCCESS_ACCURACY = 0.8


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {"depths": [3], "width": 16, "steps": 30, "lrs": [0.1],
                         "activations": ["tanh", "rbf"],
                         "remedies": ["none", "critical", "bn", "adam", "layerwise"],
                         "baseline_remedies": ["none"]}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "data": "digits",
        "width": 32,
        "depths": [10, 30] if quick else [20, 50],
        "steps": 250 if quick else 600,
        "batch_size": 64,
        # SGD cells train at each of these rates and keep the better one: a single rate cannot
        # suit every depth (even the ReLU reference fails at depth 50 with lr 0.1)
        "lrs": [0.1, 0.01],
        "seeds": 1 if quick else 2,
        "activations": list(ACTIVATIONS),
        "remedies": list(REMEDIES),
        "baseline_remedies": ["none"] if quick else list(REMEDIES),
        "critical_sigma_b2": 0.0,
        "device": "cpu",
    }


def critical_sigmas(act: str, sigma_b2: float) -> tuple[float, float] | str:
    """(sigma_w, sigma_b) at the edge of chaos, or the reason there is none."""
    from signalprop.theory import NoCriticalPoint, critical_point

    try:
        cp = critical_point(act, sigma_b2)
    except NoCriticalPoint as e:
        return str(e)
    return float(cp.sigma_w), math.sqrt(sigma_b2)


def _nf_gain(act: str) -> float:
    from signalprop.remedies import nf_gain

    return float(nf_gain(make_activation(act)))


def _sweep_variant(act: str, remedy: str, config: dict[str, Any]) -> dict[str, Any] | str:
    """Run-config overrides for one cell, or the reason it does not apply."""
    # the ReLU baseline is ReLU as it is used: with He initialisation
    none = {"init": "kaiming"} if act == "relu" else {"init": "lecun",
                                                       "init_scale": DEFAULT_SCALE}
    if remedy == "none":
        return none
    if remedy == "xavier":
        return {"init": "xavier"}
    if remedy == "orthogonal":
        return {"init": "orthogonal"}
    if remedy == "lsuv":
        return {"init": "lsuv"}
    if remedy == "critical":
        cs = critical_sigmas(act, config["critical_sigma_b2"])
        if isinstance(cs, str):
            return cs
        return {"init": "lecun", "init_scale": cs[0], "bias_std": cs[1]}
    if remedy == "scaled":
        return {"init": "lecun", "act_scale": _nf_gain(act)}
    if remedy == "bn":
        return {**none, "norm": "batch"}
    if remedy == "ln":
        return {**none, "norm": "layer"}
    if remedy == "residual":
        return {**none, "residual": True}
    if remedy in OPT_LR:
        return {**none, "optimizer": remedy, "lr": OPT_LR[remedy]}
    raise ValueError(f"remedy {remedy!r} is not run by the sweep")


def _sweep_part(config: dict[str, Any], workdir: str | Path) -> tuple[list[dict[str, Any]],
                                                                       dict[str, str]]:
    configs, na = [], {}
    acts = [a for a in config["activations"] if a != "rbf"] + ["relu"]
    for act in acts:
        rems = config["baseline_remedies"] if act == "relu" else config["remedies"]
        for rem in rems:
            if rem == "layerwise":
                continue
            v = _sweep_variant(act, rem, config)
            if isinstance(v, str):
                na[f"{act}|{rem}"] = v
                continue
            # optimiser remedies bring their own (default) rate
            lrs = [v["lr"]] if "optimizer" in v else list(config["lrs"])
            for depth in config["depths"]:
                for lr in lrs:
                    for seed in range(config["seeds"]):
                        configs.append({
                            "data": config["data"], "width": config["width"], "depth": depth,
                            "activation": act, "steps": config["steps"],
                            "batch_size": config["batch_size"], "optimizer": "sgd",
                            "record_every": 0, "seed": seed, "device": config["device"],
                            **v, "lr": lr, "tag": f"{act}|{rem}|{depth}",
                        })
    rows = run_grid(configs, workdir, "grid", **grid_options(config))
    out = []
    for r in rows:
        act, rem, depth = r["tag"].split("|")
        out.append({"activation": act, "remedy": rem, "depth": int(depth), "seed": r["seed"],
                    "lr": r["lr"], "status": r["status"], "test_accuracy": r["test_accuracy"],
                    "grad_ratio_init": r["grad_ratio_init"], "source": "sweep"})
    return out, na


# --- local part: RBF stacks and layer-wise rates ----------------------------------------------
def _local_model(act: str, depth: int, width: int, in_f: int, out_f: int) -> nn.Module:
    layers: list[nn.Module] = []
    if act == "rbf":
        from signalprop.remedies import RBF

        dims = [in_f] + [width] * depth
        layers = [RBF(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)]
    else:
        dims = [in_f] + [width] * depth
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            lin = nn.Linear(a, b)
            with torch.no_grad():
                # ReLU baseline: He init; the others: PyTorch's default variance 1/(3 fan_in)
                sd = math.sqrt(2.0) if act == "relu" else DEFAULT_SCALE
                lin.weight.normal_(0.0, sd / math.sqrt(a))
                lin.bias.zero_()
            layers += [lin, make_activation(act)]
    head = nn.Linear(width, out_f)
    with torch.no_grad():
        head.weight.normal_(0.0, DEFAULT_SCALE / math.sqrt(width))
        head.bias.zero_()
    return nn.Sequential(*layers, head)


def _local_one(config: dict[str, Any], act: str, rem: str, depth: int, seed: int,
               sgd_lr: float) -> dict[str, Any]:
    from signalprop.remedies import get_remedy
    from signalprop.remedies.optimizers import make_optimizer

    data = get_data(config["data"], config["device"])
    seeded(seed)
    model = _local_model(act, depth, config["width"], data.in_features, data.num_classes)
    name = {"none": None, "bn": "batchnorm", "ln": "layernorm", "residual": "residual",
            "layerwise": "layerwise_lr", **{k: k for k in OPT_LR}}[rem]
    remedy = get_remedy(name) if name else None
    batch = data.x_train[: config["batch_size"]]
    if remedy is not None:
        model = remedy.apply(model, batch)
        opt_name, lr, kw = remedy.optimizer_config("sgd", sgd_lr)
        gt = remedy.make_grad_transform()
    else:
        opt_name, lr, kw, gt = "sgd", sgd_lr, {}, None
    model.to(config["device"])
    r = train_classifier(
        model, data, steps=config["steps"], batch_size=config["batch_size"],
        optimizer=lambda m: make_optimizer(opt_name, m, lr, **kw), seed=seed,
        grad_transform=gt, log_every=config["steps"],
    )
    return {"activation": act, "remedy": rem, "depth": depth, "seed": seed, "lr": lr,
            "status": "diverged" if r.diverged else "done", "test_accuracy": r.final_test_acc,
            "grad_ratio_init": r.grad_ratio_io_init, "source": "local"}


def _local_part(config: dict[str, Any], workdir: str | Path) -> tuple[list[dict[str, Any]],
                                                                       dict[str, str]]:
    key = {k: config[k] for k in ("data", "width", "steps", "batch_size", "device")}
    rows, na = [], {}
    todo: list[tuple[str, str]] = []
    for act in config["activations"] + ["relu"]:
        rems = config["baseline_remedies"] if act == "relu" else config["remedies"]
        if act == "rbf":
            for r in rems:
                if r in RBF_NA:
                    na[f"rbf|{r}"] = ("initialisations of dot-product weights do not apply to "
                                      "RBF centres")
                else:
                    todo.append((act, r))
        elif "layerwise" in rems:
            todo.append((act, "layerwise"))
    for act, rem in todo:
        # SGD-based cells try every rate; optimiser remedies (incl. layer-wise) use their own
        lrs = list(config["lrs"]) if rem in ("none", "bn", "ln", "residual") else [None]
        for depth in config["depths"]:
            for lr in lrs:
                for seed in range(config["seeds"]):
                    rows.append(cached(
                        workdir, {**key, "act": act, "rem": rem, "depth": depth, "seed": seed,
                                  "lr": lr},
                        lambda a=act, r=rem, d=depth, s=seed, lr=lr: _local_one(
                            config, a, r, d, s, lr if lr is not None else config["lrs"][0]),
                        tag="local"))
    return rows, na


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    sweep_rows, na1 = _sweep_part(config, workdir)
    local_rows, na2 = _local_part(config, workdir)
    return {"runs": sweep_rows + local_rows, "not_applicable": {**na1, **na2},
            "activations": config["activations"], "remedies": config["remedies"],
            "depths": config["depths"], "steps": config["steps"]}


# --- summaries -------------------------------------------------------------------------------
def cell_table(data: dict[str, Any], metric: str, depth: int) -> tuple[list[str], np.ndarray]:
    """[rows = activations + relu, cols = remedies] per cell (NaN: not run / not applicable).

    Accuracy: the mean over seeds at the better learning rate (a diverged run counts as chance,
    0.1). Gradient ratio at initialisation (it does not depend on the rate): geometric mean over
    all runs of the cell, zeros and non-finite values left out."""
    rows = list(data["activations"]) + ["relu"]
    out = np.full((len(rows), len(data["remedies"])), np.nan)
    for i, a in enumerate(rows):
        for j, r in enumerate(data["remedies"]):
            rs = [x for x in data["runs"] if x["activation"] == a and x["remedy"] == r
                  and x["depth"] == depth]
            if not rs:
                continue
            if metric == "grad_ratio_init":
                v = np.asarray([float(x[metric]) if x.get(metric) is not None else math.nan
                                for x in rs])
                v = v[np.isfinite(v) & (v > 0)]
                out[i, j] = float(np.exp(np.mean(np.log(v)))) if v.size else np.nan
                continue
            best = math.nan
            for lr in sorted({x.get("lr") for x in rs}, key=lambda t: (t is None, t)):
                vals = []
                for x in rs:
                    if x.get("lr") != lr:
                        continue
                    v = x.get(metric)
                    if metric == "test_accuracy" and (x["status"] != "done" or v is None):
                        v = 0.1
                    vals.append(float(v) if v is not None else math.nan)
                m = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
                if math.isnan(best) or (math.isfinite(m) and m > best):
                    best = m
            out[i, j] = best
    return rows, out


def conclude(data: dict[str, Any]) -> Conclusion:
    nums: dict[str, Any] = {}
    details: list[str] = []
    verdicts: list[str] = []
    deep = max(data["depths"])
    rows, acc = cell_table(data, "test_accuracy", deep)
    rems = data["remedies"]
    relu_acc = acc[rows.index("relu"), rems.index("none")] if "none" in rems else math.nan
    nums[f"ReLU (He init) reference test accuracy, depth {deep}"] = relu_acc
    bar = SUCCESS_ACCURACY
    failing_default, rescued, unrescued = [], [], []
    for i, a in enumerate(rows[:-1]):
        none = acc[i, rems.index("none")] if "none" in rems else math.nan
        nums[f"{a}: accuracy with no remedy, depth {deep}"] = none
        cands = {r: acc[i, j] for j, r in enumerate(rems)
                 if r not in ("none", "bn") and np.isfinite(acc[i, j])}
        best = max(cands, key=cands.get) if cands else None
        if best is not None:
            nums[f"{a}: best remedy (not BN), depth {deep}"] = f"{best} ({pct(cands[best])})"
        if np.isfinite(none) and none < bar:
            failing_default.append(a)
        if best is not None and cands[best] >= bar:
            rescued.append(f"{a} ({best} {pct(cands[best])})")
        else:
            unrescued.append(a)
    details.append(
        f"Depth {deep}: with no remedy, {len(failing_default)}/{len(rows) - 1} activations stay "
        f"below {pct(bar)} test accuracy (ReLU with He init: {pct(relu_acc)}): "
        f"{', '.join(failing_default) or 'none'}."
    )
    details.append(
        f"Depth {deep}: a remedy other than BN brings {len(rescued)}/{len(rows) - 1} of them to "
        f"that level: {', '.join(rescued) or 'none'}"
        + (f"; NOT rescued by any remedy: {', '.join(unrescued)}." if unrescued else ".")
    )
    v1 = SUPPORTS if failing_default else INCONCLUSIVE  # premise: default set-up fails
    v2 = SUPPORTS if not unrescued else (CONTRADICTS if len(unrescued) > (len(rows) - 1) / 2
                                         else INCONCLUSIVE)
    verdicts += [v1, v2]
    # which remedies work most often
    score = {}
    for j, r in enumerate(rems):
        col = acc[:-1, j]
        fin = col[np.isfinite(col)]
        score[r] = (int((fin >= bar).sum()), int(fin.size))
    ranked = sorted((r for r in rems if score[r][1]), key=lambda r: -score[r][0] / score[r][1])
    details.append(
        "Remedies by how many non-ReLU activations they make trainable at depth "
        f"{deep}: " + ", ".join(f"{r} {score[r][0]}/{score[r][1]}" for r in ranked[:8]) + "."
    )
    _, gr = cell_table(data, "grad_ratio_init", deep)
    if "none" in rems:
        col = gr[:-1, rems.index("none")]
        for a, v in zip(rows[:-1], col, strict=True):
            nums[f"{a}: first/output gradient ratio at init, no remedy, depth {deep}"] = v
    for k, reason in data.get("not_applicable", {}).items():
        if k.endswith("|critical"):
            details.append(f"{k.split('|')[0]}: no critical initialisation: {reason}")
    verdict = combine_verdicts(verdicts)
    sentence = " ".join([details[1], details[0]])
    return conclusion(CLAIM, sentence, verdict, nums, details)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    out = []
    depths = data["depths"]
    fig, axes = P.subplots(len(depths), 1, size=(9.0, 3.3))
    for ax, depth in zip(axes[:, 0], depths, strict=True):
        rows, acc = cell_table(data, "test_accuracy", depth)
        P.heatmap(ax, acc, rows, data["remedies"], cmap="viridis", vmin=0.0, vmax=1.0,
                  fmt="{:.2f}", cbar_label="test accuracy")
        ax.set_title(f"Test accuracy after {data['steps']} steps, depth {depth}")
        ax.set_xlabel("remedy")
        ax.set_ylabel("activation")
    out.append(P.save(fig, d / "anynl_accuracy.png"))
    fig, axes = P.subplots(len(depths), 1, size=(9.0, 3.3))
    for ax, depth in zip(axes[:, 0], depths, strict=True):
        rows, gr = cell_table(data, "grad_ratio_init", depth)
        P.heatmap(ax, gr, rows, data["remedies"], cmap="coolwarm", log=True, fmt="{:.0e}",
                  vmin=1e-6, vmax=1e6, cbar_label="||dL/dW_first|| / ||dL/dW_out||")
        ax.set_title(f"Gradient ratio at initialisation, depth {depth}")
        ax.set_xlabel("remedy")
        ax.set_ylabel("activation")
    out.append(P.save(fig, d / "anynl_grad_ratio.png"))
    return out
