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

from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import nets
from signalprop.lab import plotting as P
from signalprop.lab.clipping import adding_problem, time_profile
from signalprop.remedies import get_remedy

VERSION = 2
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
    "the last state are shared. Trained by signalprop.train.fit with Adam and the same step "
    "budget for every arm (300 steps quick, 1500 full: at 500-800 steps the LSTM solved T = 50 "
    "in only half the seeds); rate policy: one Adam rate (1e-2) for every arm by default, or "
    "each arm and T at its best rate of the grid `lrs` when it has several (lowest mean "
    "validation MSE over seeds). Budget criterion: the reference arm (LSTM) must solve a length "
    "in at least 80% of seeds; the gated cells are judged against the tanh RNN at the longest "
    "such T (none: the budget is too small, inconclusive). Metric: success = test MSE below 0.05 "
    "(the network explains "
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
#: The reference arm: the budget must let it solve the task (else the comparison is void).
REFERENCE = "LSTM"
#: Budget criterion: the reference arm solves a length in at least this fraction of seeds.
BUDGET_SUCCESS = 0.8
#: Arms whose success at the budget's length tests the claim (the others are reported).
GATED = ("LSTM", "GRU")
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
        "steps": 300 if quick else 1500,
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


def _one(config: dict[str, Any], arm: str, T: int, lr: float, seed: int) -> dict[str, Any]:
    dev = config["device"]
    sets = _sets(config, T)
    xtr, ytr = sets["train"]
    model, gt = build(arm, config["hidden"], seed, xtr[: config["batch_size"]])
    steps = int(config["steps"])
    last = steps - 1
    res = nets.fit(model, (xtr, ytr), F.mse_loss, steps=steps, optimizer="adam", lr=lr,
              batch_size=config["batch_size"], probe={"forward": False, "weights": False},
              schedule=[0, last], grad_transform=gt, device=dev, seed=seed)
    out: dict[str, Any] = {"arm": arm, "T": T, "lr": lr, "seed": seed, "diverged": res.diverged,
                           "train_loss": res.final_loss,
                           "grad_t_init": time_profile(res.record, 0),
                           "grad_t_final": time_profile(res.record, last),
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
    cells = [B.Cell({**key, "arm": arm, "T": T, "lr": lr, "seed": s}, _one,
                    (config, arm, T, lr, s), tag=f"rnn-T{T}")
             for T in config["lengths"] for arm in config["arms"] for lr in config["lrs"]
             for s in config["seeds"]]
    runs = B.cached_cells(workdir, cells, workers=config.get("workers", 1))
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


def success_counts(runs: list[dict[str, Any]], arms: list[str], Ts: list[int]
                   ) -> dict[str, dict[int, tuple[int, int, Any]]]:
    """arm -> T -> (successes, seeds, best rate) at each arm's best rate."""
    out: dict[str, dict[int, tuple[int, int, Any]]] = {}
    for a in arms:
        out[a] = {}
        for T in Ts:
            rs = best_rate_runs(runs, a, T)
            out[a][T] = (sum(success(r) for r in rs), len(rs), rs[0]["lr"] if rs else None)
    return out


def budget_T(counts: dict[str, dict[int, tuple[int, int, Any]]], Ts: list[int]) -> int | None:
    """The longest T at which the reference arm meets the budget criterion (None: none)."""
    ok = [T for T in Ts if REFERENCE in counts and counts[REFERENCE][T][1]
          and counts[REFERENCE][T][0] / counts[REFERENCE][T][1] >= BUDGET_SUCCESS]
    return max(ok) if ok else None


def measure(data: dict[str, Any]) -> dict[str, Any]:
    """The numbers the conclusion quotes: success counts, the budget check, the vanishing
    through time at init, and success differences against the tanh RNN (with intervals)."""
    runs, arms, Ts = data["runs"], data["arms"], data["lengths"]
    Tmax = max(Ts)
    counts = success_counts(runs, arms, Ts)
    Tb = budget_T(counts, Ts)
    out: dict[str, Any] = {"counts": counts, "Tmax": Tmax, "Tb": Tb, "gated": {}, "other": {}}
    if "tanh RNN" not in arms:
        return out
    out["vanishing"] = E.mean_effect(
        [vanishing_log10(r) for r in best_rate_runs(runs, "tanh RNN", Tmax)],
        f"log10 ||dL/dh_1||/||dL/dh_T|| (tanh RNN, T={Tmax}, init)")
    # gating is judged at the longest T the budget suffices for (the reference arm solves it)
    Tg = Tb if Tb is not None else Tmax
    k0, n0, _ = counts["tanh RNN"][Tg]
    for a in arms:
        if a == "tanh RNN":
            continue
        k, n, _ = counts[a][Tg]
        kind = "gated" if a in GATED else "other"
        out[kind][a] = E.rate_diff_effect(k, n, k0, n0, f"success {a} - tanh RNN (T={Tg})")
    if "clip norm" in arms:
        out["clip_profile"] = E.mean_effect(
            [vanishing_log10(r, "grad_t_final") for r in best_rate_runs(runs, "clip norm", Tmax)],
            f"log10 ||dL/dh_1||/||dL/dh_T|| (clip norm, T={Tmax}, trained)")
    return out


def _say_gated(m: dict[str, Any], nums: dict[str, Any]) -> tuple[list[str], str | None]:
    """Clauses on the gated cells and their verdict (``None``: no gated arm)."""
    parts, vs = [], []
    for eff in m["gated"].values():
        v = E.verdict(eff, +1)
        if m["Tb"] is None:
            v = B.INCONCLUSIVE  # the budget did not let the reference arm learn the task
        nums.update(E.numbers(eff))
        parts.append(E.describe(eff, v, B.pct))
        vs.append(v)
    if not vs:
        return parts, None
    # the claim is that gating helps: one gated cell that clearly does is enough
    return parts, B.SUPPORTS if B.SUPPORTS in vs else B.combine_verdicts(vs)


def conclude(data: dict[str, Any]) -> B.Conclusion:
    m = measure(data)
    counts, Tb = m["counts"], m["Tb"]
    nums: dict[str, Any] = {"steps": data["steps"], "success MSE": SUCCESS_MSE,
                            "rates": data["lrs"], "budget T (reference solves)": Tb}
    for a, byT in counts.items():
        for T, (k, n, lr) in byT.items():
            nums[f"{a} T={T} success"] = f"{k}/{n}"
            nums[f"{a} T={T} best lr"] = lr
    verdicts, parts, details = [], [], []
    if "vanishing" in m:
        v1 = E.verdict(m["vanishing"], -1)
        verdicts.append(v1)
        nums.update(E.numbers(m["vanishing"]))
        parts.append(E.describe(m["vanishing"], v1))
    gparts, gv = _say_gated(m, nums)
    parts += gparts
    if gv is not None:
        verdicts.append(gv)
    for eff in m["other"].values():
        nums.update(E.numbers(eff))
        details.append(E.describe(eff, E.verdict(eff, +1), B.pct) + ".")
    if "clip_profile" in m:
        cl = m["clip_profile"]
        details.append("Clipping by norm leaves the through-time profile as it is: "
                       + E.describe(cl, E.verdict(cl, -1)) + ".")
    budget = (f"Budget criterion: the reference arm ({REFERENCE}) solves T in at least "
              f"{B.pct(BUDGET_SUCCESS)} of seeds; met up to T={Tb}." if Tb is not None else
              f"Budget criterion NOT met: the reference arm ({REFERENCE}) solves no length in "
              f"at least {B.pct(BUDGET_SUCCESS)} of seeds, so the budget is too small to judge "
              "the gated cells.")
    table = "; ".join(f"{a}: " + ", ".join(f"T={T} {k}/{n}" for T, (k, n, _) in byT.items())
                      for a, byT in counts.items())
    sentence = (f"Adding problem after {data['steps']} Adam steps (best rate per arm): successes "
                f"(test MSE < {SUCCESS_MSE}) {table}. {budget} " + "; ".join(parts) + ".")
    verdict = B.combine_verdicts(verdicts) if verdicts else B.INCONCLUSIVE
    return B.conclusion(CLAIM, sentence, verdict, nums, [budget, *details])


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

