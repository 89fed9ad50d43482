"""Does gradient clipping tame exploding gradients?

Two settings where gradients explode: (1) a deep tanh MLP in the chaotic phase (sigma_w = 3,
sigma_b = 0: chi_1 ~ 1.86, so the squared gradient norm grows by that factor per layer towards the
input while the bounded outputs stay finite: gradients exploding with depth, not an output-scale
blow-up) trained with SGD through the sweep runner, each method at its own best rate of a grid; (2) a vanilla tanh RNN with a chaotic recurrent matrix
(W_hh ~ N(0, g^2/H), g > 1) on the adding problem (Hochreiter & Schmidhuber 1997), a long-sequence
task. Each is trained without clipping, with clipping by global norm, by value, and with adaptive
gradient clipping (AGC, Brock et al. 2021), from several seeds: divergence rate and final loss.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from signalprop.lab import evidence as E
from signalprop.lab import plotting as P
from signalprop.lab.base import (
    CONTRADICTS,
    INCONCLUSIVE,
    Conclusion,
    cached,
    combine_verdicts,
    conclusion,
    fmt,
    pct,
)
from signalprop.lab.grid import grid_options, run_grid

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 2
NAME = "clipping"
TITLE = "Gradient clipping against exploding gradients"
QUESTION = "Does gradient clipping stop exploding gradients from wrecking training?"
CLAIM = (
    "Clipping gradients (by global norm, by value, or adaptively per unit) prevents the "
    "divergence that exploding gradients cause, in deep feed-forward nets with a too-large "
    "initialisation and in recurrent nets on long sequences (Pascanu et al. 2013; Brock et al. "
    "2021)."
)
SETUP = (
    "MLP: tanh, 12 (full: 20) hidden layers of 64, Gaussian weights with sigma_w = 3, zero "
    "biases (chaotic phase: the per-layer growth of the squared gradient norm, chi_1 from "
    "signalprop.theory, is held against a measurement in a wide random net), SGD on "
    "scikit-learn digits (sweep runner); rate policy: every method trains at every rate of the "
    "grid and is compared at its own best rate (lowest mean final training loss; a diverged run "
    "counts as chance, ln 10); metric: final training loss, Welch 95% interval over seeds (3 "
    "quick, 5 full); divergence counted at the largest rate. RNN: nn.RNN (tanh) with 32 hidden units, recurrent "
    "weights N(0, 1.5^2/H), a linear read-out of the last state, SGD with batch 32 on the adding "
    "problem (inputs: uniform values and two markers, one in each half; target: the sum of the "
    "two marked values; MSE; predicting the mean scores 1/6). Methods: none; clip by global norm "
    "(1.0); clip by value (0.1); AGC (lambda 0.01, output layer excluded); for the RNN also no "
    "clipping at a 10x smaller rate (the matched baseline: does clipping beat just stepping "
    "less?). A run diverges when its loss becomes non-finite (MLP) or exceeds 100x its initial "
    "value (RNN). Divergence rates are compared with Newcombe 95% intervals."
)
REFERENCES = [
    "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks",
    "Brock, De, Smith & Simonyan 2021, High-performance large-scale image recognition without "
    "normalization (AGC)",
    "Hochreiter & Schmidhuber 1997 (the adding problem)",
]
CAPTIONS = {
    "clipping_divergence": "Fraction of seeds that diverged, per clipping method (Wilson 95% "
    "intervals), for the exploding MLP at the largest rate of its grid and the vanilla RNN.",
    "clipping_loss": "Final loss per clipping method (one dot per seed; diverged runs drawn at "
    "the top as crosses).",
}

METHODS = ("none", "norm", "value", "agc")
#: RNN only: no clipping at a 10x smaller rate.
SLOW = "none, lr/10"
#: Tolerance on the measured chi_1 (per-layer growth of the squared gradient norm).
CHI_TOL = 0.10


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {
    "mlp": {"data": "digits", "depth": 4, "width": 32, "activation": "tanh", "init": "lecun",
            "init_scale": 3.0, "lr": 0.1, "steps": 30, "batch_size": 64},
    "mlp_seeds": 3, "mlp_lrs": [0.1], "profile_width": 64,
    "rnn": {"hidden": 16, "length": 10, "gain": 1.5, "lr": 0.05, "steps": 30, "batch_size": 16,
            "test_size": 100},
    "rnn_seeds": [0, 1],
}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "mlp": {
            "data": "digits", "depth": 12 if quick else 20, "width": 64, "activation": "tanh",
            "init": "lecun", "init_scale": 3.0, "lr": 0.1, "steps": 300 if quick else 1000,
            "batch_size": 64,
        },
        "mlp_lrs": [0.01, 0.03, 0.1, 0.3] if quick else [0.003, 0.01, 0.03, 0.1, 0.3],
        "mlp_seeds": 3 if quick else 5,
        "profile_width": 256 if quick else 512,
        "thresholds": {"norm": 1.0, "value": 0.1, "agc": 0.01},
        "rnn": {
            "hidden": 32, "length": 30 if quick else 60, "gain": 1.5, "lr": 0.05,
            "steps": 300 if quick else 1000, "batch_size": 32, "test_size": 1000,
        },
        "rnn_seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
        "device": "cpu",
    }


# --- MLP part (sweep) ------------------------------------------------------------------------
def _mlp(config: dict[str, Any], workdir: str | Path) -> list[dict[str, Any]]:
    th = config["thresholds"]
    variants = {"none": {"clip": "none"}}
    for m in ("norm", "value", "agc"):
        variants[m] = {"clip": m, "clip_threshold": th[m]}
    grid = {
        "base": {**config["mlp"], "optimizer": "sgd", "record_every": 0,
                 "device": config["device"]},
        "axes": {"method": variants, "lr": list(config.get("mlp_lrs", [config["mlp"]["lr"]]))},
        "seeds": config["mlp_seeds"],
    }
    rows = run_grid(grid, workdir, "mlp", **grid_options(config))
    return [{"method": r["method"], "lr": r["lr"], "seed": r["seed"], "status": r["status"],
             "final_loss": r["train_loss"], "test_accuracy": r["test_accuracy"],
             "grad_ratio_init": r.get("grad_ratio_init")} for r in rows]


def _chi1(config: dict[str, Any]) -> dict[str, Any]:
    """chi_1 of the MLP's set-up: theory vs the per-layer growth measured in a wide random net."""
    from signalprop.theory.torch_adapter import measure_gradient_profile

    c = config["mlp"]
    sw2 = float(c["init_scale"]) ** 2
    out = []
    for seed in range(3):
        p = measure_gradient_profile(c["activation"], sw2, 0.0, depth=max(12, c["depth"]),
                                     width=config.get("profile_width", 256), batch_size=16,
                                     seed=seed, device=config["device"])
        out.append({"seed": seed, "measured": p.measured_rate, "predicted": p.predicted_rate})
    return {"runs": out}


# --- RNN part --------------------------------------------------------------------------------
def adding_problem(
    n: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem: x [n, T, 2] (values in [0, 1], markers), y [n, 1] = sum of the two
    marked values (one marker in each half of the sequence)."""
    v = torch.rand(n, length, generator=generator)
    m = torch.zeros(n, length)
    i = torch.randint(0, length // 2, (n,), generator=generator)
    j = torch.randint(length // 2, length, (n,), generator=generator)
    rows = torch.arange(n)
    m[rows, i] = 1.0
    m[rows, j] = 1.0
    return torch.stack([v, m], dim=-1), (v * m).sum(1, keepdim=True)


class VanillaRNN(nn.Module):
    """tanh RNN with a linear read-out of the last hidden state."""

    def __init__(self, hidden: int, gain: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity="tanh")
        self.out = nn.Linear(hidden, 1)
        with torch.no_grad():
            # a chaotic recurrent matrix (spectral radius ~ gain > 1): gradients explode with T
            self.rnn.weight_hh_l0.normal_(0.0, gain / math.sqrt(hidden))
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])


def _transform(method: str, th: dict[str, float]) -> Any:
    if method == "none":
        return None
    from signalprop.remedies.gradients import adaptive_clip, clip_by_global_norm, clip_by_value

    return {"norm": lambda: clip_by_global_norm(th["norm"]),
            "value": lambda: clip_by_value(th["value"]),
            "agc": lambda: adaptive_clip(th["agc"])}[method]()


def _rnn_one(config: dict[str, Any], method: str, seed: int) -> dict[str, Any]:
    c = config["rnn"]
    dev = config["device"]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = VanillaRNN(c["hidden"], c["gain"]).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=c["lr"] / (10 if method == SLOW else 1))
    tr = _transform("none" if method == SLOW else method, config["thresholds"])
    xt, yt = adding_problem(c["test_size"], c["length"], torch.Generator().manual_seed(10**6))
    xt, yt = xt.to(dev), yt.to(dev)
    losses, gnorms = [], []
    diverged, dstep, bound = False, None, math.inf
    for step in range(c["steps"]):
        x, y = adding_problem(c["batch_size"], c["length"], g)
        loss = ((net(x.to(dev)) - y.to(dev)) ** 2).mean()
        lv = float(loss.detach())
        if step == 0:
            bound = 100.0 * max(lv, 1.0)
        if not math.isfinite(lv) or lv > bound:
            diverged, dstep = True, step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorms.append(float(torch.sqrt(sum((p.grad**2).sum() for p in net.parameters()))))
        if tr is not None:
            tr(net)
        opt.step()
        losses.append(lv)
    with torch.no_grad():
        test = float(((net(xt) - yt) ** 2).mean()) if not diverged else math.nan
    return {"method": method, "seed": seed, "diverged": diverged, "diverged_step": dstep,
            "final_loss": test if math.isfinite(test) else math.nan,
            "max_grad_norm": max(gnorms) if gnorms else math.nan,
            "losses": losses[:: max(1, len(losses) // 100)]}


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    rkey = {"rnn": config["rnn"], "thresholds": config["thresholds"], "device": config["device"]}
    rnn = [cached(workdir, {**rkey, "method": m, "seed": s},
                  lambda m=m, s=s: _rnn_one(config, m, s), tag="rnn")
           for m in (*METHODS, SLOW) for s in config["rnn_seeds"]]
    chi = cached(workdir, {"mlp": config["mlp"], "w": config.get("profile_width", 256),
                           "device": config["device"]}, lambda: _chi1(config), tag="chi1")
    return {"mlp": _mlp(config, workdir), "rnn": rnn, "rnn_baseline": 1.0 / 6.0, "chi1": chi,
            "chance_loss": math.log(10)}


# --- conclusions -----------------------------------------------------------------------------
def _summ(rows: list[dict[str, Any]], diverged_key: str) -> dict[str, dict[str, float]]:
    out = {}
    for m in (*METHODS, SLOW):
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        if diverged_key == "status":
            div = [r["status"] != "done" for r in rs]
        else:
            div = [bool(r["diverged"]) for r in rs]
        fl = [float(r["final_loss"]) for r, d in zip(rs, div, strict=True)
              if not d and r["final_loss"] is not None and math.isfinite(float(r["final_loss"]))]
        out[m] = {"div": int(sum(div)), "div_rate": float(np.mean(div)), "n": len(rs),
                  "final_loss": float(np.median(fl)) if fl else math.nan}
    return out


def _score(r: dict[str, Any], chance: float) -> float:
    fl = r.get("final_loss")
    if r.get("status") != "done" or fl is None or not math.isfinite(float(fl)):
        return chance
    return min(float(fl), chance)


def best_rate_losses(rows: list[dict[str, Any]], method: str, chance: float
                     ) -> tuple[float, list[float]]:
    """(best rate, per-seed final losses there) of ``method``: the rate of the grid with the
    lowest mean final loss (a diverged run scores as chance)."""
    mine = [r for r in rows if r["method"] == method]
    best: tuple[float, list[float]] = (math.nan, [])
    best_mean = math.inf
    for lr in sorted({r.get("lr", math.nan) for r in mine}):
        sc = [_score(r, chance) for r in mine if r.get("lr", math.nan) == lr
              or (math.isnan(lr) and "lr" not in r)]
        if sc and float(np.mean(sc)) < best_mean:
            best, best_mean = (lr, sc), float(np.mean(sc))
    return best


def conclude(data: dict[str, Any]) -> Conclusion:
    nums: dict[str, Any] = {}
    details: list[str] = []
    verdicts: list[str] = []
    chance = float(data.get("chance_loss", math.log(10)))
    chi = (data.get("chi1") or {}).get("runs") or []
    if chi:
        chk = E.theory_check("chi_1 (per-layer growth of the squared gradient norm)",
                             chi[0]["predicted"], float(np.mean([c["measured"] for c in chi])),
                             CHI_TOL)
        nums["chi_1 theory check"] = chk.to_dict()
        details.append("Theory vs measurement (MLP set-up): " + chk.text() + ".")
    # MLP: each method at its own best rate
    mlp = data["mlp"]
    if any(r["method"] == "none" for r in mlp):
        lr0, base = best_rate_losses(mlp, "none", chance)
        lrn, normd = best_rate_losses(mlp, "norm", chance)
        eff = E.diff_effect(normd, base, "MLP final loss, clip norm - none (each at its best "
                            "rate)")
        v = E.verdict(eff, -1)
        nums.update(E.numbers(eff))
        parts = []
        for m in METHODS:
            lr, sc = best_rate_losses(mlp, m, chance)
            nums[f"MLP: best lr, {m}"] = lr
            nums[f"MLP: final loss at best lr, {m}"] = float(np.mean(sc)) if sc else math.nan
            parts.append(f"{m} {fmt(float(np.mean(sc)) if sc else math.nan)} (lr {fmt(lr)})")
        top = max({r.get("lr", 0) for r in mlp})
        s_top = _summ([r for r in mlp if r.get("lr", 0) == top], "status")
        if "none" in s_top and "norm" in s_top:
            dv = E.rate_diff_effect(s_top["norm"]["div"], s_top["norm"]["n"],
                                    s_top["none"]["div"], s_top["none"]["n"],
                                    f"MLP divergence at lr {fmt(top)}, norm - none")
            nums.update(E.numbers(dv))
            details.append(f"MLP divergence at the largest rate: {E.describe(dv, E.verdict(dv, -1), pct)}.")
        details.append(
            "MLP (chaotic tanh, exploding with depth): final training loss at each method's best "
            "rate: " + ", ".join(parts) + f"; {E.describe(eff, v)}"
            + (" (clipping did NOT help beyond choosing the rate)." if v == CONTRADICTS else ".")
        )
        verdicts.append(v)
    # RNN: divergence with and without clipping at the same rate; and vs a 10x smaller rate
    s = _summ(data["rnn"], "diverged")
    if "none" in s and "norm" in s:
        for m, st in s.items():
            nums[f"RNN: divergence rate, {m}"] = st["div_rate"]
            nums[f"RNN: median final loss, {m}"] = st["final_loss"]
        dv = E.rate_diff_effect(s["norm"]["div"], s["norm"]["n"], s["none"]["div"],
                                s["none"]["n"], "RNN divergence, clip norm - none")
        v = E.verdict(dv, -1)
        if s["none"]["div"] == 0 and s["norm"]["div"] == 0:
            v = INCONCLUSIVE
        nums.update(E.numbers(dv))
        details.append(
            "RNN (adding problem): diverged " + ", ".join(
                f"{m} {st['div']}/{st['n']}" for m, st in s.items()) + f"; {E.describe(dv, v, pct)}"
            + (" (clipping did NOT reduce divergence)." if v == CONTRADICTS else ".")
        )
        verdicts.append(v)
        bl = float(data.get("rnn_baseline", 1 / 6))
        details.append(
            "RNN: final test MSE (median over non-diverged seeds) "
            + ", ".join(f"{m} {fmt(st['final_loss'])}" for m, st in s.items())
            + f"; predicting the mean scores {fmt(bl)} (learning the task needs a gated cell or "
            "an identity init: see the recurrent study)."
        )
    verdict = combine_verdicts(verdicts)
    sentence = " ".join(d for d in details if d.startswith(("MLP (", "RNN (")))
    if verdict == CONTRADICTS:
        sentence = "The measurements contradict the claim: " + sentence
    return conclusion(CLAIM, sentence or "No runs to compare.", verdict, nums, details)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    out = []
    top = max((r.get("lr", 0) for r in data["mlp"]), default=0)
    parts = (("MLP (chaotic tanh), largest rate", [r for r in data["mlp"]
                                                  if r.get("lr", 0) == top], "status"),
             ("vanilla RNN, adding problem", data["rnn"], "diverged"))
    fig, axes = P.subplots(1, 2, size=(4.2, 3.3), sharey=True)
    colors = [P.PLAIN, P.NORMED, P.THIRD, P.FOURTH, "#ff7f0e"]
    for ax, (title, rows, key) in zip(axes[0], parts, strict=True):
        s = _summ(rows, key)
        ms = [m for m in (*METHODS, SLOW) if m in s]
        effs = [E.rate_effect(s[m]["div"], s[m]["n"], m) for m in ms]
        ax.bar(ms, [s[m]["div_rate"] for m in ms], color=(colors * 2)[: len(ms)])
        P.errorbars(ax, range(len(ms)), effs, color="#333333", ls="none")
        for i, m in enumerate(ms):
            ax.text(i, s[m]["div_rate"] + 0.02, f"{s[m]['div_rate'] * s[m]['n']:.0f}/{s[m]['n']}",
                    ha="center", fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("clipping method")
        ax.set_ylabel("fraction of seeds diverged")
        ax.set_title(title)
    out.append(P.save(fig, d / "clipping_divergence.png"))
    fig, axes = P.subplots(1, 2, size=(4.2, 3.3))
    for ax, (title, rows, key) in zip(axes[0], parts, strict=True):
        fin = [float(r["final_loss"]) for r in rows if r["final_loss"] is not None
               and math.isfinite(float(r["final_loss"]))]
        top = max(fin) * 3 if fin else 10.0
        for i, m in enumerate((*METHODS, SLOW)):
            rs = [r for r in rows if r["method"] == m]
            for j, r in enumerate(rs):
                dv = (r["status"] != "done") if key == "status" else bool(r["diverged"])
                x = i + (j - len(rs) / 2) * 0.05
                if dv or r["final_loss"] is None or not math.isfinite(float(r["final_loss"])):
                    ax.plot(x, top, "x", color=colors[i], ms=7)
                else:
                    ax.plot(x, float(r["final_loss"]), "o", color=colors[i], ms=4)
        if key == "diverged":
            ax.axhline(data.get("rnn_baseline", 1 / 6), color="#555", ls=":", lw=1,
                       label="predict the mean (1/6)")
            ax.legend(loc="center right")
        ax.set_xticks(range(len(METHODS) + 1))
        ax.set_xticklabels([*METHODS, "lr/10"])
        if key == "status":  # MLP losses span decades; the RNN's MSE stays near 1/6
            ax.set_yscale("log")
        ax.set_xlabel("clipping method (x = diverged)")
        ax.set_ylabel("final training loss" if key == "status" else "final test MSE")
        ax.set_title(title)
    out.append(P.save(fig, d / "clipping_loss.png"))
    return out
