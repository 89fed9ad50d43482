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
from torch.nn import functional as F

from signalprop.data import load_dataset
from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import grid as G
from signalprop.lab import nets
from signalprop.lab import plotting as P
from signalprop.remedies import RBF, Scaled, get_remedy, make_activation, nf_gain
from signalprop.theory import NoCriticalPoint, critical_point
from signalprop.theory.torch_adapter import measure_gradient_profile

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 3
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
    "MLPs of width 64 on scikit-learn digits, trained for a fixed budget of steps (batch 64) from "
    "the 'none' set-up: weights N(0, 1/(3 fan_in)) (the variance of PyTorch's default "
    "initialisation), zero biases. Rate policy: every cell trains at every rate of a grid (SGD "
    "cells: the SGD grid; optimiser cells: their default rate and 3x it) and keeps its best rate "
    "(highest mean test accuracy over seeds; 3 seeds quick, 5 full). Budget criterion: the ReLU "
    "reference (He init) must reach 80% test accuracy at the deepest depth, otherwise the "
    "conclusion says the budget is too small and stays inconclusive. Each remedy changes one "
    "thing: he (He-scale weights, sigma_w^2 = 2), xavier, "
    "orthogonal (Saxe et al.), critical (edge of chaos, sigma_w and sigma_b from "
    "signalprop.theory.critical_point at sigma_b^2 = 0; none exists for softplus), lsuv (Mishkin "
    "& Matas), scaled (the NF recipe of Brock et al. 2021: scaled weight standardisation, each "
    "unit's fan-in weights centred and divided by their norm, paired with the gain a = "
    "1/std(phi(z)) on the activation), bn and ln (before the activation), residual "
    "(h + block(h)), highway (registry 'highway': gated carry, gate bias -2), and the optimisers "
    "RMSProp (1e-3), Rprop (1e-2), SMORMS3 (1e-3), Adam (1e-3) and layer-wise rates (LARS trust "
    "ratio, registry 'layerwise_lr'; this and the RBF optimiser cells at their default rate only). The RBF row stacks RBF layers calibrated from the data "
    "(each layer's centres are inputs it receives, its width the median-distance heuristic, so "
    "the spread of its outputs across inputs does not collapse with depth; norms act on the "
    "distance pre-activation); dot-product initialisations do not apply to it (n/a). "
    "'Trainable' means at least 80% test accuracy after the step budget; effects are accuracy "
    "differences with Welch 95% intervals. chi_1 per layer from signalprop.theory is printed "
    "beside the per-layer gradient growth measured at init, (first/output gradient ratio)^(2/L)."
)
REFERENCES = [
    "Schoenholz et al. 2017 (critical initialisation); Saxe et al. 2013 (orthogonal)",
    "Mishkin & Matas 2016 (LSUV); Brock, De & Smith 2021 (scaled activations / NF gains)",
    "Ba, Kiros & Hinton 2016 (layer norm); He et al. 2016 (residual)",
    "Riedmiller & Braun 1993 (Rprop); Funk 2015 (SMORMS3); You et al. 2017 (LARS)",
]
CAPTIONS = {
    "anynl_accuracy": "Test accuracy after training, per activation (rows) and remedy (columns), "
    "at each depth (each cell at its best rate of the grid; mean over seeds); grey: not "
    "applicable.",
    "anynl_grad_ratio": "First-layer over output-layer gradient norm at initialisation (log "
    "colour scale; << 1 vanishing, >> 1 exploding); grey: not applicable or zero.",
    "anynl_rescue": "At the deepest depth: test accuracy with no remedy and with the best remedy "
    "other than BN, per activation (each at its best rate; mean over seeds, 95% intervals).",
}

ACTIVATIONS = ["sigmoid", "tanh", "gaussian", "rbf", "softplus"]
REMEDIES = ["none", "he", "xavier", "orthogonal", "critical", "lsuv", "scaled", "bn", "ln",
            "residual", "highway", "rmsprop", "rprop", "smorms3", "adam", "layerwise"]
#: remedies trained on nn.Modules with the lab's loop (the engine has no such layer)
LOCAL = {"scaled", "highway", "layerwise"}
#: learning rates of the optimiser remedies (their usual defaults)
OPT_LR = {"rmsprop": 1e-3, "rprop": 1e-2, "smorms3": 1e-3, "adam": 1e-3}
#: remedies that do not apply to a stack of RBF layers (they initialise dot-product weights)
RBF_NA = {"he", "xavier", "orthogonal", "critical", "lsuv", "scaled"}
DEFAULT_SCALE = 1 / math.sqrt(3)  # PyTorch's default Linear init has Var W = 1/(3 fan_in)
#: "Trainable": test accuracy of at least this much after the step budget (a well-trained MLP
#: reaches ~95% on digits; chance is 10%). An absolute bar, because the ReLU reference itself can
#: fail at depth within a fixed budget.
SUCCESS_ACCURACY = 0.8


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {"depths": [3], "width": 16, "steps": 30, "lrs": [0.1],
                         "activations": ["tanh", "rbf"], "opt_lr_factors": [1.0],
                         "remedies": ["none", "critical", "scaled", "bn", "adam", "layerwise"],
                         "baseline_remedies": ["none"]}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "data": "digits",
        "width": 64,
        "depths": [12] if quick else [16],
        "steps": 400 if quick else 500,
        "batch_size": 64,
        "lrs": [0.01, 0.1],
        "opt_lr_factors": [1.0, 3.0],
        "seeds": 3 if quick else 5,
        "activations": list(ACTIVATIONS),
        "remedies": (["none", "he", "critical", "scaled", "ln", "residual", "adam"]
                     if quick else list(REMEDIES)),
        "baseline_remedies": ["none"],
        "critical_sigma_b2": 0.0,
        "device": "cpu",
    }


def critical_sigmas(act: str, sigma_b2: float) -> tuple[float, float] | str:
    """(sigma_w, sigma_b) at the edge of chaos, or the reason there is none."""
    try:
        cp = critical_point(act, sigma_b2)
    except NoCriticalPoint as e:
        return str(e)
    return float(cp.sigma_w), math.sqrt(sigma_b2)


def _nf_gain(act: str) -> float:
    return float(nf_gain(make_activation(act)))


def _sweep_variant(act: str, remedy: str, config: dict[str, Any]) -> dict[str, Any] | str:
    """Run-config overrides for one cell, or the reason it does not apply."""
    # the ReLU baseline is ReLU as it is used: with He initialisation
    none = {"init": "kaiming"} if act == "relu" else {"init": "lecun",
                                                       "init_scale": DEFAULT_SCALE}
    if remedy == "none":
        return none
    if remedy == "he":
        return {"init": "kaiming"}
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
            if rem in LOCAL:
                continue
            v = _sweep_variant(act, rem, config)
            if isinstance(v, str):
                na[f"{act}|{rem}"] = v
                continue
            # optimiser remedies: their default rate and multiples of it
            lrs = ([v["lr"] * f for f in config.get("opt_lr_factors", [1.0])]
                   if "optimizer" in v else list(config["lrs"]))
            for depth in config["depths"]:
                for lr in lrs:
                    for seed in range(int(config["seeds"])):
                        configs.append({
                            "data": config["data"], "width": config["width"], "depth": depth,
                            "activation": act, "steps": config["steps"],
                            "batch_size": config["batch_size"], "optimizer": "sgd",
                            "record_every": 0, "seed": seed, "device": config["device"],
                            **v, "lr": lr, "tag": f"{act}|{rem}|{depth}",
                        })
    rows = G.run_grid(configs, workdir, "grid", **G.grid_options(config))
    out = []
    for r in rows:
        act, rem, depth = r["tag"].split("|")
        out.append({"activation": act, "remedy": rem, "depth": int(depth), "seed": r["seed"],
                    "lr": r["lr"], "status": r["status"], "test_accuracy": r["test_accuracy"],
                    "grad_ratio_init": r["grad_ratio_init"], "source": "sweep"})
    return out, na


# --- local part: RBF stacks and layer-wise rates ----------------------------------------------
class ScaledWSLinear(nn.Linear):
    """Scaled weight standardisation (Brock et al. 2021): W_hat = (W - mean) / (std sqrt(fan_in))
    per output unit, so every unit's pre-activation has unit variance for unit-variance inputs;
    paired with an NF gain on the activation it is the normaliser-free recipe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mu = w.mean(1, keepdim=True)
        sd = w.std(1, keepdim=True, unbiased=False).clamp_min(1e-6)
        return nn.functional.linear(x, (w - mu) / (sd * math.sqrt(w.shape[1])), self.bias)


@torch.no_grad()
def calibrate_rbf_(model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> None:
    """Data-dependent RBF initialisation, layer by layer: centres are inputs the layer receives
    (a random sample of the batch) and the width is the median-distance heuristic
    s^2 = median ||x - c||^2 / 2, so that u / (2 s^2) ~ 1 and outputs spread over (0, 1)."""
    h = x
    for m in model:
        if isinstance(m, RBF):
            k = m.out_features
            idx = torch.randint(0, h.shape[0], (k,), generator=generator).to(h.device)
            m.distance.centers.copy_(h[idx] + 0.01 * torch.randn(k, h.shape[1],
                                                                 generator=generator))
            d2 = torch.cdist(h, m.distance.centers).pow(2)
            s2 = float(d2.median()) / 2.0
            m.kernel.log_width.fill_(0.5 * math.log(max(s2, 1e-8)))
        h = m(h)


def output_spread(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per hidden layer: the standard deviation across inputs of each unit's output, averaged
    over units (a collapsing stack drives it to 0)."""
    out, h = [], x
    with torch.no_grad():
        for m in model:
            h = m(h)
            if m is not model[-1]:
                out.append(float(h.std(0).mean()))
    return out


def _local_model(act: str, depth: int, width: int, in_f: int, out_f: int,
                 ws: bool = False) -> nn.Module:
    layers: list[nn.Module] = []
    if act == "rbf":
        dims = [in_f] + [width] * depth
        layers = [RBF(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)]
    else:
        dims = [in_f] + [width] * depth
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            lin = ScaledWSLinear(a, b) if ws else nn.Linear(a, b)
            with torch.no_grad():
                # ReLU baseline: He init; the others: PyTorch's default variance 1/(3 fan_in)
                sd = math.sqrt(2.0) if act == "relu" else DEFAULT_SCALE
                lin.weight.normal_(0.0, sd / math.sqrt(a))
                lin.bias.zero_()
            phi = make_activation(act)
            if ws:
                phi = Scaled(phi, _nf_gain(act))
            layers += [lin, phi]
    head = nn.Linear(width, out_f)
    with torch.no_grad():
        head.weight.normal_(0.0, DEFAULT_SCALE / math.sqrt(width))
        head.bias.zero_()
    return nn.Sequential(*layers, head)


#: local remedy -> remedy registry name (``None``: no remedy, or the model's own ``scaled`` build)
LOCAL_REMEDY = {"none": None, "scaled": None, "bn": "batchnorm", "ln": "layernorm",
                "residual": "residual", "highway": "highway", "layerwise": "layerwise_lr",
                **{k: k for k in OPT_LR}}


def _local_one(config: dict[str, Any], act: str, rem: str, depth: int, seed: int,
               sgd_lr: float) -> dict[str, Any]:
    dev = config["device"]
    data = load_dataset(config["data"])
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = _local_model(act, depth, config["width"], data.in_features, data.num_classes,
                         ws=rem == "scaled")
    batch = data.x_train[: max(config["batch_size"], 256)]
    spread = []
    if act == "rbf":
        calibrate_rbf_(model, batch, g)
        spread = output_spread(model, batch)
    name = LOCAL_REMEDY[rem]
    opt, lr, kw, gt = "sgd", sgd_lr, {}, None
    if name is not None:
        remedy = get_remedy(name)
        model = remedy.apply(model, batch)
        opt, lr, kw = remedy.optimizer_config("sgd", sgd_lr)
        gt = remedy.make_grad_transform()
    res = nets.fit(model, (data.x_train, data.y_train), F.cross_entropy, steps=config["steps"],
              optimizer=opt, lr=lr, optimizer_kwargs=kw, batch_size=config["batch_size"],
              grad_transform=gt, probe={"forward": False, "backward": False}, schedule=[0],
              device=dev, seed=seed)
    acc = math.nan if res.diverged else nets.accuracy(model, data.x_test.to(dev),
                                                      data.y_test.to(dev))
    return {"activation": act, "remedy": rem, "depth": depth, "seed": seed, "lr": lr,
            "status": "diverged" if res.diverged else "done", "test_accuracy": acc,
            "grad_ratio_init": res.grad_ratio, "source": "local",
            "output_spread_init": spread}


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
        else:
            todo += [(act, r) for r in rems if r in LOCAL]
    cells = []
    for act, rem in todo:
        # SGD-based cells try every rate; optimiser remedies (incl. layer-wise) use their own
        lrs = list(config["lrs"]) if rem in ("none", "bn", "ln", "residual", "highway",
                                             "scaled") else [None]
        for depth in config["depths"]:
            for lr in lrs:
                for seed in range(int(config["seeds"])):
                    cells.append(B.Cell(
                        {**key, "act": act, "rem": rem, "depth": depth, "seed": seed, "lr": lr},
                        _local_one,
                        (config, act, rem, depth, seed, lr if lr is not None else config["lrs"][0]),
                        tag="local"))
    rows += B.cached_cells(workdir, cells, workers=config.get("workers", 1))
    return rows, na


def _chi1(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer growth of the squared gradient norm in wide random nets (width 256) at the
    'none' scale and at He scale, beside theory's chi_1."""
    out = []
    for act in config["activations"]:
        if act == "rbf":
            continue
        for sw2 in (DEFAULT_SCALE ** 2, 2.0):
            for seed in range(3):
                p = measure_gradient_profile(act, sw2, 0.0, depth=max(config["depths"]),
                                             width=256, batch_size=16, seed=seed,
                                             device=config["device"])
                out.append({"activation": act, "sigma_w2": sw2, "seed": seed,
                            "measured": p.measured_rate, "predicted": p.predicted_rate})
    return out


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    sweep_rows, na1 = _sweep_part(config, workdir)
    local_rows, na2 = _local_part(config, workdir)
    chi = B.cached(workdir, {"acts": config["activations"], "depths": config["depths"],
                           "device": config["device"]}, lambda: _chi1(config), tag="chi1")
    return {"runs": sweep_rows + local_rows, "not_applicable": {**na1, **na2}, "chi1": chi,
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


def best_cell(data: dict[str, Any], act: str, rem: str, depth: int) -> tuple[Any, list[float]]:
    """(best rate, per-seed test accuracies there) of one cell; a diverged run counts as 0.1."""
    rs = [x for x in data["runs"] if x["activation"] == act and x["remedy"] == rem
          and x["depth"] == depth]
    best: tuple[Any, list[float]] = (None, [])
    best_m = -math.inf
    for lr in sorted({x.get("lr") for x in rs}, key=lambda t: (t is None, t)):
        vals = [float(x["test_accuracy"]) if x["status"] == "done" and
                x.get("test_accuracy") is not None else 0.1
                for x in rs if x.get("lr") == lr]
        if vals and float(np.mean(vals)) > best_m:
            best, best_m = (lr, vals), float(np.mean(vals))
    return best


def _measure_activation(data: dict[str, Any], a: str, deep: int) -> dict[str, Any]:
    """One activation at the deepest depth: no remedy vs its best remedy other than BN (each at
    its best rate), against the trainability bar."""
    bar = SUCCESS_ACCURACY
    lr0, none = best_cell(data, a, "none", deep)
    out: dict[str, Any] = {"none": none, "e0": E.mean_effect(none, f"{a} no remedy", null=bar)}
    cands = {}
    for r in data["remedies"]:
        if r not in ("none", "bn"):
            lr, v = best_cell(data, a, r, deep)
            if v:
                cands[r] = (lr, v)
    if not cands:
        return out
    best = max(cands, key=lambda r: float(np.mean(cands[r][1])))
    lr, v = cands[best]
    out.update(best=best, lr=lr, vals=v, eb=E.mean_effect(v, f"{a} + {best}", null=bar),
               all_below=all(E.verdict(E.mean_effect(c[1], null=bar), -1) == B.SUPPORTS
                             for c in cands.values()))
    if none:
        out["gain"] = E.diff_effect(v, none, f"{a}: {best} - no remedy")
    return out


def _theory_checks(data: dict[str, Any]) -> list[tuple[str, str, E.TheoryCheck]]:
    """(activation, scale, check): chi_1 at the 'none' and He scales, theory vs the measured
    per-layer growth."""
    checks = []
    for a in data["activations"]:
        for sw2, tag in ((DEFAULT_SCALE ** 2, "none"), (2.0, "He")):
            ms = [c for c in data.get("chi1", []) if c["activation"] == a
                  and abs(c["sigma_w2"] - sw2) < 1e-9]
            if ms and all(math.isfinite(c["measured"]) for c in ms):
                checks.append((a, tag, E.theory_check(
                    f"{a} chi_1 at {tag} scale (sigma_w^2 = {sw2:.3g})", ms[0]["predicted"],
                    float(np.mean([c["measured"] for c in ms])), 0.10,
                    note="finite width/depth")))
    return checks


def measure(data: dict[str, Any]) -> dict[str, Any]:
    """The numbers the conclusion quotes: the ReLU reference (budget check), per activation its
    no-remedy and best-remedy accuracies with intervals, and the chi_1 theory checks."""
    deep = max(data["depths"])
    _, ref = best_cell(data, "relu", "none", deep)
    return {"deep": deep,
            "ref": E.mean_effect(ref, f"ReLU (He) reference accuracy, depth {deep}",
                                 null=SUCCESS_ACCURACY),
            "budget_ok": bool(ref) and float(np.mean(ref)) >= SUCCESS_ACCURACY,
            "acts": {a: _measure_activation(data, a, deep) for a in data["activations"]},
            "checks": _theory_checks(data)}


def _classify(m: dict[str, Any], nums: dict[str, Any]) -> dict[str, list[str]]:
    """Activations sorted into failing (no remedy), rescued, not rescued and undecided."""
    deep, out = m["deep"], {"failing": [], "rescued": [], "not": [], "undecided": []}
    for a, am in m["acts"].items():
        if am["none"]:
            nums[f"{a}: accuracy with no remedy, depth {deep}"] = float(np.mean(am["none"]))
            if E.verdict(am["e0"], -1) == B.SUPPORTS:
                out["failing"].append(a)
        if "best" not in am:
            continue
        nums[f"{a}: best remedy (not BN), depth {deep}"] = \
            f"{am['best']} ({B.pct(float(np.mean(am['vals'])))})"
        if "gain" in am:
            nums.update(E.numbers(am["gain"]))
        txt = am["eb"].text(B.pct)
        if E.verdict(am["eb"], +1) == B.SUPPORTS:
            out["rescued"].append(f"{a} ({am['best']}, lr {am['lr']}: {txt})")
        elif am["all_below"]:
            out["not"].append(f"{a} (best {am['best']}: {txt})")
        else:
            out["undecided"].append(f"{a} (best {am['best']}: {txt})")
    return out


def conclude(data: dict[str, Any]) -> B.Conclusion:
    m = measure(data)
    deep, bar, n = m["deep"], SUCCESS_ACCURACY, len(data["activations"])
    nums: dict[str, Any] = {**E.numbers(m["ref"])}
    details = [
        f"Budget check: the ReLU reference (He init, best SGD rate) reaches "
        f"{E.describe(m['ref'], B.SUPPORTS, B.pct)} at depth {deep} after {data['steps']} "
        f"steps (criterion: mean >= {B.pct(bar)})"
        + ("." if m["budget_ok"] else ": the budget is too small to judge the others.")]
    c = _classify(m, nums)
    for a, tag, chk in m["checks"]:
        nums[f"{a}: chi_1 check ({tag})"] = chk.to_dict()
        nums[f"{a}: chi_1^L at {tag} scale, depth {deep}"] = chk.predicted ** deep
    details.append(
        f"Depth {deep}: with no remedy, {len(c['failing'])}/{n} activations stay below "
        f"{B.pct(bar)} test accuracy with the whole 95% interval: "
        f"{', '.join(c['failing']) or 'none'}.")
    details.append(
        f"Depth {deep}: a remedy other than BN brings {len(c['rescued'])}/{n} above it "
        f"(interval above {B.pct(bar)}): {'; '.join(c['rescued']) or 'none'}"
        + (f". NOT rescued by any remedy tried (every interval below): {'; '.join(c['not'])}"
           if c["not"] else "")
        + (f". Undecided: {'; '.join(c['undecided'])}" if c["undecided"] else "") + ".")
    if m["checks"]:
        details.append("Theory vs measurement: " + "; ".join(k.text() for _, _, k in m["checks"]) + ".")
    for k, reason in data.get("not_applicable", {}).items():
        if k.endswith("|critical"):
            details.append(f"{k.split('|')[0]}: no critical initialisation: {reason}")
    if not m["budget_ok"]:
        verdict = B.INCONCLUSIVE
    elif len(c["not"]) > n / 2:
        verdict = B.CONTRADICTS
    elif c["failing"] and len(c["rescued"]) == n:
        verdict = B.SUPPORTS
    else:
        verdict = B.INCONCLUSIVE
    nums["rescued / not rescued / undecided"] = \
        f"{len(c['rescued'])}/{len(c['not'])}/{len(c['undecided'])}"
    return B.conclusion(CLAIM, " ".join(details[:3]), verdict, nums, details)


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
    deep = max(depths)
    fig, axes = P.subplots(1, 1, size=(7.0, 3.4))
    ax = axes[0, 0]
    acts = list(data["activations"]) + ["relu"]
    for k, rem in enumerate(("none", "best")):
        effs, xs = [], []
        for i, a in enumerate(acts):
            if rem == "none":
                v = best_cell(data, a, "none", deep)[1]
            else:
                cands = [best_cell(data, a, r, deep)[1] for r in data["remedies"]
                         if r not in ("none", "bn")]
                cands = [c for c in cands if c]
                v = max(cands, key=lambda c: float(np.mean(c))) if cands else []
            if v:
                effs.append(E.mean_effect(v, a))
                xs.append(i + (k - 0.5) * 0.25)
        if effs:
            P.errorbars(ax, xs, effs, color=P.PLAIN if rem == "none" else P.NORMED,
                        label="no remedy" if rem == "none" else "best remedy other than BN",
                        ls="none")
    ax.axhline(SUCCESS_ACCURACY, color="#555555", ls="--", lw=1, label="trainable")
    ax.set_xticks(range(len(acts)))
    ax.set_xticklabels(acts)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("test accuracy (best rate)")
    ax.set_title(f"Depth {deep}: mean over seeds with 95% intervals")
    ax.legend(loc="lower right", fontsize=7)
    out.append(P.save(fig, d / "anynl_rescue.png"))
    return out
