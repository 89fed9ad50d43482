"""Recurrent networks through time: which remedies keep the adding problem learnable as T grows?

Hochreiter & Schmidhuber 1997 introduced the adding problem (sum the two marked values of a
sequence of length T) to show that a vanilla RNN cannot bridge long time lags because
dL/dh_t = dL/dh_T prod_{k>t} diag(phi'(a_k)) W_hh shrinks geometrically with T - t, and that the
LSTM's gated cell can. Pascanu, Mikolov & Bengio 2013 analysed the product (vanishing when the
spectral radius of W_hh times |phi'| is below 1, exploding above) and introduced clipping by norm
for the exploding side (it cannot help the vanishing side). Le, Jaitly & Hinton 2015 showed that
a ReLU RNN with identity recurrent weights (IRNN) learns the adding problem to T in the hundreds.

Every arm is built from the remedies registry by name (``lstm``, ``gru``,
``orthogonal_recurrent_init``, ``identity_recurrent_init``, ``forget_gate_bias``, ``clip_norm``),
trained by the package's loop (:func:`signalprop.train.fit`), and ||dL/dh_t|| per time step is
read from the probe's record (its through-time view of ``nn.RNN/LSTM/GRU``) at initialisation and
at the end of training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from signalprop.lab import evidence as E
from signalprop.lab import plotting as P
from signalprop.lab.base import (
    INCONCLUSIVE,
    SUPPORTS,
    Conclusion,
    cached,
    combine_verdicts,
    conclusion,
    pct,
)
from signalprop.lab.clipping import adding_problem

VERSION = 1
NAME = "recurrent"
TITLE = "Recurrent networks through time: the adding problem vs sequence length"
QUESTION = (
    "Why does a vanilla RNN fail on long sequences, and which remedy (LSTM, GRU, orthogonal or "
    "identity recurrent init, clipping by norm) keeps it trainable as the time lag grows?"
)
CLAIM = (
    "In a vanilla tanh RNN ||dL/dh_t|| vanishes back through time, so it fails the adding problem "
    "at long T; gated cells (LSTM, GRU) keep learning it (Hochreiter & Schmidhuber 1997; Cho et al. "
    "2014), identity-initialised ReLU RNNs too (Le et al. 2015), while clipping by norm only "
    "addresses exploding gradients (Pascanu et al. 2013)."
)
SETUP = (
    "Adding problem (values in [0, 1] with two markers, one per half; target the sum; predicting "
    "the mean gives MSE ~0.167) at several lengths T. Arms (remedy registry names): vanilla tanh "
    "RNN (PyTorch init), + orthogonal_recurrent_init, ReLU RNN + identity_recurrent_init (IRNN), "
    "+ clip_norm (1.0), lstm + forget_gate_bias (1.0), gru; hidden size and the linear read-out of "
    "the last state are shared. Trained by signalprop.train.fit with Adam and a fixed step "
    "budget; rate policy: one Adam rate (1e-2) for every arm by default, or each arm and T at its "
    "best rate of the grid `lrs` when it has several (lowest mean validation MSE over seeds). Metric: success = test MSE below 0.05 (the network explains "
    "more than 70% of the target variance), counted over seeds with Wilson/Newcombe 95% "
    "intervals. ||dL/dh_t|| per time step comes from the probe's through-time record at step 0 "
    "and at the last step."
)
REFERENCES = [
    "Hochreiter & Schmidhuber 1997, Long short-term memory (the adding problem)",
    "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks",
    "Le, Jaitly & Hinton 2015, A simple way to initialize recurrent networks of rectified linear "
    "units (IRNN)",
    "Cho et al. 2014 (GRU); Gers et al. 2000, Jozefowicz et al. 2015 (forget-gate bias)",
]
CAPTIONS = {
    "recurrent_success": "Success rate (test MSE < 0.05) vs sequence length T per arm, with "
    "Wilson 95% intervals over seeds.",
    "recurrent_time_profile": "||dL/dh_t|| / ||dL/dh_T|| vs time step at initialisation (left) "
    "and after training (right), at the longest T, from the probe's through-time record (mean "
    "over seeds of log10, with the 95% interval).",
}

#: arm -> (recurrent nonlinearity, remedy registry names applied in order)
ARMS: dict[str, tuple[str, list[str]]] = {
    "tanh RNN": ("tanh", []),
    "orthogonal": ("tanh", ["orthogonal_recurrent_init"]),
    "IRNN": ("relu", ["identity_recurrent_init"]),
    "clip norm": ("tanh", ["clip_norm"]),
    "LSTM": ("tanh", ["lstm", "forget_gate_bias"]),
    "GRU": ("tanh", ["gru"]),
}
#: Test MSE below this counts as solving the adding problem.
SUCCESS_MSE = 0.05
#: Predicting the mean (1.0) gives this MSE: Var(U1 + U2) = 2/12.
BASELINE_MSE = 1.0 / 6.0

SMOKE: dict[str, Any] = {"lengths": [5, 10], "steps": 20, "seeds": [0, 1, 2], "lrs": [1e-2],
                         "arms": ["tanh RNN", "GRU"], "train_size": 256, "val_size": 64,
                         "test_size": 128}


def get_config(quick: bool) -> dict[str, Any]:
    return {
        "lengths": [10, 30] if quick else [50, 100, 200],
        "hidden": 32,
        "batch_size": 32,
        "steps": 300 if quick else 500,
        "lrs": [1e-2],
        "seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
        "arms": list(ARMS),
        "train_size": 4096 if quick else 20000,
        "val_size": 500,
        "test_size": 1000,
        "device": "cpu",
    }


class SeqToOne(nn.Module):
    """A recurrent layer (``self.rnn``) with a linear read-out of its last hidden state."""

    def __init__(self, hidden: int, nonlinearity: str) -> None:
        super().__init__()
        self.rnn: nn.RNNBase = nn.RNN(2, hidden, batch_first=True, nonlinearity=nonlinearity)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def build(arm: str, hidden: int, seed: int, example: torch.Tensor) -> tuple[nn.Module, Any]:
    """The arm's model and gradient transform (or ``None``), from the remedy registry."""
    from signalprop.remedies import get_remedy

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {', '.join(ARMS)}")
    nonlin, names = ARMS[arm]
    torch.manual_seed(seed)
    model: nn.Module = SeqToOne(hidden, nonlin)
    gt = None
    for name in names:
        rem = get_remedy(name)
        if rem.transform is not None:
            model = rem.transform(model, example)
        if rem.grad_transform is not None:
            gt = rem.make_grad_transform()
    return model, gt


def _sets(config: dict[str, Any], T: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for i, (name, n) in enumerate((("train", config["train_size"]), ("val", config["val_size"]),
                                   ("test", config["test_size"]))):
        out[name] = adding_problem(n, T, torch.Generator().manual_seed(1000 * T + i))
    return out


def _time_profile(record: Any, step: int) -> list[float]:
    layer = next((n for n in record.layer_names() if n.endswith("rnn")), None)
    if layer is None:
        return []
    _, g = record.time_profile(layer, step)
    return g.tolist()


def _one(config: dict[str, Any], arm: str, T: int, lr: float, seed: int) -> dict[str, Any]:
    from signalprop.train import fit

    dev = config["device"]
    sets = _sets(config, T)
    xtr, ytr = sets["train"]
    model, gt = build(arm, config["hidden"], seed, xtr[: config["batch_size"]])
    steps = int(config["steps"])
    last = steps - 1
    res = fit(model, (xtr, ytr), F.mse_loss, steps=steps, optimizer="adam", lr=lr,
              batch_size=config["batch_size"], probe={"forward": False, "weights": False},
              schedule=[0, last], grad_transform=gt, device=dev, seed=seed)
    out: dict[str, Any] = {"arm": arm, "T": T, "lr": lr, "seed": seed, "diverged": res.diverged,
                           "train_loss": res.final_loss,
                           "grad_t_init": _time_profile(res.record, 0),
                           "grad_t_final": _time_profile(res.record, last),
                           "wall_s": res.wall_time}
    model.eval()
    with torch.no_grad():
        for name in ("val", "test"):
            x, y = sets[name]
            mse = float(F.mse_loss(model(x.to(dev)), y.to(dev)))
            out[f"{name}_mse"] = mse if math.isfinite(mse) else math.nan
    return out


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    key = {k: v for k, v in config.items() if k not in ("arms", "lengths", "lrs", "seeds")}
    runs = []
    for T in config["lengths"]:
        for arm in config["arms"]:
            for lr in config["lrs"]:
                for s in config["seeds"]:
                    runs.append(cached(workdir, {**key, "arm": arm, "T": T, "lr": lr, "seed": s},
                                       lambda a=arm, t=T, r=lr, s=s: _one(config, a, t, r, s),
                                       tag=f"rnn-T{T}"))
    return {"runs": runs, "lengths": config["lengths"], "arms": config["arms"],
            "lrs": config["lrs"], "steps": config["steps"]}


# --- analysis ---------------------------------------------------------------------------------
def best_rate_runs(runs: list[dict[str, Any]], arm: str, T: int) -> list[dict[str, Any]]:
    """The seeds of ``arm`` at ``T`` trained at its best rate (lowest mean validation MSE, a
    diverged seed counting as the mean predictor's MSE)."""
    mine = [r for r in runs if r["arm"] == arm and r["T"] == T]
    best, best_score = [], math.inf
    for lr in sorted({r["lr"] for r in mine}):
        rs = [r for r in mine if r["lr"] == lr]
        score = float(np.mean([_val(r) for r in rs]))
        if score < best_score:
            best, best_score = rs, score
    return best


def _val(r: dict[str, Any]) -> float:
    v = r.get("val_mse", math.nan)
    return BASELINE_MSE if (r.get("diverged") or not math.isfinite(v)) else min(v, 10.0)


def success(r: dict[str, Any]) -> bool:
    v = r.get("test_mse", math.nan)
    return bool(not r.get("diverged") and math.isfinite(v) and v < SUCCESS_MSE)


def vanishing_log10(r: dict[str, Any], key: str = "grad_t_init") -> float:
    """log10(||dL/dh_1|| / ||dL/dh_T||) of one run (NaN when not recorded)."""
    g = r.get(key) or []
    if len(g) < 2 or not (g[0] > 0 and g[-1] > 0):
        return math.nan
    return math.log10(g[0] / g[-1])


def conclude(data: dict[str, Any]) -> Conclusion:
    runs, arms, Ts = data["runs"], data["arms"], data["lengths"]
    Tmax = max(Ts)
    nums: dict[str, Any] = {"steps": data["steps"], "success MSE": SUCCESS_MSE,
                            "rates": data["lrs"]}
    rates: dict[str, dict[int, tuple[int, int]]] = {}
    for a in arms:
        rates[a] = {}
        for T in Ts:
            rs = best_rate_runs(runs, a, T)
            rates[a][T] = (sum(success(r) for r in rs), len(rs))
            nums[f"{a} T={T} success"] = f"{rates[a][T][0]}/{rates[a][T][1]}"
            if rs:
                nums[f"{a} T={T} best lr"] = rs[0]["lr"]
    verdicts, parts, details = [], [], []
    # 1. vanishing through time at init in the vanilla tanh RNN (the probe's record)
    if "tanh RNN" in arms:
        van = E.mean_effect([vanishing_log10(r) for r in best_rate_runs(runs, "tanh RNN", Tmax)],
                            f"log10 ||dL/dh_1||/||dL/dh_T|| (tanh RNN, T={Tmax}, init)")
        v1 = E.verdict(van, -1)
        verdicts.append(v1)
        nums.update(E.numbers(van))
        parts.append(E.describe(van, v1))
    # 2. gated cells succeed where the vanilla RNN fails, at the longest T
    if "tanh RNN" in arms:
        k0, n0 = rates["tanh RNN"][Tmax]
        for g in ("LSTM", "GRU"):
            if g in arms:
                k, n = rates[g][Tmax]
                eff = E.rate_diff_effect(k, n, k0, n0, f"success {g} - tanh RNN (T={Tmax})")
                v = E.verdict(eff, +1)
                nums.update(E.numbers(eff))
                parts.append(E.describe(eff, v, pct))
                verdicts.append(v)
        for other in ("IRNN", "orthogonal", "clip norm"):
            if other in arms:
                k, n = rates[other][Tmax]
                eff = E.rate_diff_effect(k, n, k0, n0, f"success {other} - tanh RNN (T={Tmax})")
                nums.update(E.numbers(eff))
                details.append(E.describe(eff, E.verdict(eff, +1), pct) + ".")
    gated = verdicts[1:]
    # the claim is that gating helps: one gated cell that clearly does is enough
    if gated:
        gv = SUPPORTS if SUPPORTS in gated else combine_verdicts(gated)
        verdict = combine_verdicts([verdicts[0], gv])
    else:
        verdict = verdicts[0] if verdicts else INCONCLUSIVE
    table = "; ".join(
        f"{a}: " + ", ".join(f"T={T} {rates[a][T][0]}/{rates[a][T][1]}" for T in Ts)
        for a in arms)
    sentence = (
        f"Adding problem after {data['steps']} Adam steps (best rate per arm): successes "
        f"(test MSE < {SUCCESS_MSE}) {table}. " + "; ".join(parts) + "."
    )
    if "clip norm" in arms and "tanh RNN" in arms:
        cl = E.mean_effect([vanishing_log10(r, "grad_t_final") for r in
                            best_rate_runs(runs, "clip norm", Tmax)],
                           f"log10 ||dL/dh_1||/||dL/dh_T|| (clip norm, T={Tmax}, trained)")
        details.append("Clipping by norm leaves the through-time profile as it is: "
                       + E.describe(cl, E.verdict(cl, -1)) + ".")
    return conclusion(CLAIM, sentence, verdict, nums, details)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    runs, arms, Ts = data["runs"], data["arms"], data["lengths"]
    colors = dict(zip(arms, [P.PLAIN, P.NORMED, P.THIRD, P.FOURTH, "#ff7f0e", "#8c564b"],
                      strict=False))
    fig, axes = P.subplots(1, 1, size=(5.5, 3.6))
    ax = axes[0, 0]
    for i, a in enumerate(arms):
        effs = []
        for T in Ts:
            rs = best_rate_runs(runs, a, T)
            effs.append(E.rate_effect(sum(success(r) for r in rs), len(rs), a))
        x = np.asarray(Ts, dtype=float) * (1 + 0.02 * (i - len(arms) / 2))  # dodge
        P.errorbars(ax, x, effs, color=colors[a], label=a)
    ax.set_xscale("log")
    ax.set_xticks(Ts)
    ax.set_xticklabels([str(t) for t in Ts])
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(f"success rate (test MSE < {SUCCESS_MSE})")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="lower left", fontsize=7)
    out = [P.save(fig, P.figdir(workdir) / "recurrent_success.png")]

    Tmax = max(Ts)
    fig, axes = P.subplots(1, 2, size=(4.6, 3.4))
    for ax, key, title in ((axes[0, 0], "grad_t_init", "at initialisation"),
                           (axes[0, 1], "grad_t_final", "after training")):
        for a in arms:
            prof = []
            for r in best_rate_runs(runs, a, Tmax):
                g = np.asarray(r.get(key) or [], dtype=float)
                if g.size > 1 and g[-1] > 0:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        prof.append(np.log10(g / g[-1]))
            if prof:
                P.mean_band(ax, np.arange(1, len(prof[0]) + 1), prof, color=colors[a], label=a)
        ax.set_xlabel("time step t")
        ax.set_ylabel("log10 ||dL/dh_t|| / ||dL/dh_T||")
        ax.set_title(f"T={Tmax}, {title}")
    axes[0, 0].legend(loc="lower right", fontsize=6)
    out.append(P.save(fig, P.figdir(workdir) / "recurrent_time_profile.png"))
    return out

