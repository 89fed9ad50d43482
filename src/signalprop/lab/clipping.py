"""Does gradient clipping tame exploding gradients?

Two settings where gradients explode: (1) a deep ReLU MLP with a too-large initialisation (He
init times 1.5, so the squared gradient norm grows by ~2.25 per layer towards the input) trained
with SGD, run through the sweep runner; (2) a vanilla tanh RNN with a chaotic recurrent matrix
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
from signalprop.lab.grid import grid_options, run_grid

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 1
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
    "MLP: ReLU, 10 hidden layers of 64, He init x 1.5 (exploding), zero biases, SGD on "
    "scikit-learn digits (sweep runner). RNN: nn.RNN (tanh) with 32 hidden units, recurrent "
    "weights N(0, 1.5^2/H), a linear read-out of the last state, SGD with batch 32 on the adding "
    "problem (inputs: uniform values and two markers, one in each half; target: the sum of the "
    "two marked values; MSE; predicting the mean scores 1/6). Methods: none; clip by global norm "
    "(1.0); clip by value (0.1); AGC (lambda 0.01, output layer excluded). A run diverges when "
    "its loss becomes non-finite (MLP) or exceeds 100x its initial value (RNN)."
)
REFERENCES = [
    "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks",
    "Brock, De, Smith & Simonyan 2021, High-performance large-scale image recognition without "
    "normalization (AGC)",
    "Hochreiter & Schmidhuber 1997 (the adding problem)",
]
CAPTIONS = {
    "clipping_divergence": "Fraction of seeds that diverged, per clipping method, for the "
    "exploding MLP and the vanilla RNN.",
    "clipping_loss": "Final loss per clipping method (one dot per seed; diverged runs drawn at "
    "the top as crosses).",
}

METHODS = ("none", "norm", "value", "agc")


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {
    "mlp": {"data": "digits", "depth": 4, "width": 32, "activation": "relu", "init": "kaiming",
            "init_scale": 1.5, "lr": 0.1, "steps": 30, "batch_size": 64},
    "mlp_seeds": 2,
    "rnn": {"hidden": 16, "length": 10, "gain": 1.5, "lr": 0.05, "steps": 30, "batch_size": 16,
            "test_size": 100},
    "rnn_seeds": [0, 1],
}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "mlp": {
            "data": "digits", "depth": 10, "width": 64, "activation": "relu",
            "init": "kaiming", "init_scale": 1.5, "lr": 0.1, "steps": 300 if quick else 1000,
            "batch_size": 64,
        },
        "mlp_seeds": 4 if quick else 8,
        "thresholds": {"norm": 1.0, "value": 0.1, "agc": 0.01},
        "rnn": {
            "hidden": 32, "length": 30 if quick else 60, "gain": 1.5, "lr": 0.05,
            "steps": 300 if quick else 1000, "batch_size": 32, "test_size": 1000,
        },
        "rnn_seeds": [0, 1, 2] if quick else list(range(6)),
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
        "axes": {"method": variants},
        "seeds": config["mlp_seeds"],
    }
    rows = run_grid(grid, workdir, "mlp", **grid_options(config))
    return [{"method": r["method"], "seed": r["seed"], "status": r["status"],
             "final_loss": r["train_loss"], "test_accuracy": r["test_accuracy"]} for r in rows]


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
    opt = torch.optim.SGD(net.parameters(), lr=c["lr"])
    tr = _transform(method, config["thresholds"])
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
           for m in METHODS for s in config["rnn_seeds"]]
    return {"mlp": _mlp(config, workdir), "rnn": rnn, "rnn_baseline": 1.0 / 6.0}


# --- conclusions -----------------------------------------------------------------------------
def _summ(rows: list[dict[str, Any]], diverged_key: str) -> dict[str, dict[str, float]]:
    out = {}
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        if diverged_key == "status":
            div = [r["status"] != "done" for r in rs]
        else:
            div = [bool(r["diverged"]) for r in rs]
        fl = [float(r["final_loss"]) for r, d in zip(rs, div, strict=True)
              if not d and r["final_loss"] is not None and math.isfinite(float(r["final_loss"]))]
        out[m] = {"div_rate": float(np.mean(div)), "n": len(rs),
                  "final_loss": float(np.median(fl)) if fl else math.nan}
    return out


def conclude(data: dict[str, Any]) -> Conclusion:
    nums: dict[str, Any] = {}
    details: list[str] = []
    verdicts: list[str] = []
    for part, rows, key in (("MLP", data["mlp"], "status"), ("RNN", data["rnn"], "diverged")):
        s = _summ(rows, key)
        if "none" not in s:
            continue
        for m, v in s.items():
            nums[f"{part}: divergence rate, {m}"] = v["div_rate"]
            nums[f"{part}: median final loss, {m}"] = v["final_loss"]
        base = s["none"]["div_rate"]
        clipped = {m: s[m]["div_rate"] for m in ("norm", "value", "agc") if m in s}
        worse = [m for m, r in clipped.items() if r > base]
        better = [m for m, r in clipped.items() if r < base]
        if base == 0 and worse:
            v = CONTRADICTS
            details.append(
                f"{part}: no unclipped run diverged, but with clipping "
                + ", ".join(f"{m} {pct(clipped[m])}" for m in worse)
                + " of seeds did: clipping caused divergence instead of preventing it."
            )
        elif base == 0:
            v = INCONCLUSIVE
            details.append(f"{part}: no unclipped run diverged (0/{s['none']['n']}), so there was "
                           "nothing for clipping to prevent.")
        else:
            if "norm" in clipped and clipped["norm"] < base and not worse:
                v = SUPPORTS
            elif not better:
                v = CONTRADICTS
            else:
                v = INCONCLUSIVE
            details.append(
                f"{part}: without clipping {pct(base)} of seeds diverged; with clipping by norm "
                f"{pct(clipped.get('norm'))}, by value {pct(clipped.get('value'))}, AGC "
                f"{pct(clipped.get('agc'))}"
                + (" (clipping did NOT reduce divergence)." if v == CONTRADICTS else ".")
            )
        verdicts.append(v)
        if part == "RNN":
            bl = float(data.get("rnn_baseline", 1 / 6))
            learned = [m for m in ("norm", "value", "agc")
                       if m in s and s[m]["final_loss"] < 0.5 * bl]
            finite = [m for m in ("norm", "value", "agc")
                      if m in s and math.isfinite(s[m]["final_loss"])]
            details.append(
                "RNN: final test MSE (median over non-diverged seeds) "
                + ", ".join(f"{m} {fmt(s[m]['final_loss'])}" for m in s)
                + f"; predicting the mean scores {fmt(bl)}: "
                + ("no clipped run stayed finite." if not finite else
                   "clipped runs that stay finite still did not learn the task in this budget."
                   if not learned else f"{', '.join(learned)} learned beyond the baseline.")
            )
    verdict = combine_verdicts(verdicts)
    sentence = " ".join(d for d in details if "diverge" in d)
    if verdict == CONTRADICTS:
        sentence = "The measurements contradict the claim: " + sentence
    return conclusion(CLAIM, sentence or "No runs to compare.", verdict, nums, details)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    out = []
    parts = (("MLP (He x 1.5, 10 layers)", data["mlp"], "status"),
             ("vanilla RNN, adding problem", data["rnn"], "diverged"))
    fig, axes = P.subplots(1, 2, size=(4.2, 3.3), sharey=True)
    colors = [P.PLAIN, P.NORMED, P.THIRD, P.FOURTH]
    for ax, (title, rows, key) in zip(axes[0], parts, strict=True):
        s = _summ(rows, key)
        ms = [m for m in METHODS if m in s]
        ax.bar(ms, [s[m]["div_rate"] for m in ms], color=colors[: len(ms)])
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
        for i, m in enumerate(METHODS):
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
        ax.set_xticks(range(len(METHODS)))
        ax.set_xticklabels(METHODS)
        if key == "status":  # MLP losses span decades; the RNN's MSE stays near 1/6
            ax.set_yscale("log")
        ax.set_xlabel("clipping method (x = diverged)")
        ax.set_ylabel("final training loss" if key == "status" else "final test MSE")
        ax.set_title(title)
    out.append(P.save(fig, d / "clipping_loss.png"))
    return out
