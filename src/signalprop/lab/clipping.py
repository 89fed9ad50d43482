"""Does gradient clipping tame exploding gradients?

Two settings where gradients explode: (1) a deep tanh MLP in the chaotic phase (sigma_w = 3,
sigma_b = 0: chi_1 ~ 1.9, so the squared gradient norm grows by that factor per layer towards the
input while the bounded outputs stay finite: gradients exploding with depth, not an output-scale
blow-up; the study measures the first/output gradient ratio at initialisation to show it) trained
with SGD through the sweep runner; (2) a vanilla tanh RNN with a chaotic recurrent matrix
(W_hh ~ N(0, g^2/H), g > 1) on the adding problem (Hochreiter & Schmidhuber 1997), trained by the
package's loop (:func:`signalprop.train.fit`) with the clipping remedies applied by their registry
names (``clip_norm``, ``clip_value``, ``agc``, ``lower_lr``); its ||dL/dh_t|| through time and
gradient norms come from the probe's record. Every method trains at every rate of a grid and is
compared at its own best rate; divergence is compared at the largest rate, and against no clipping
at a 10x smaller rate.
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
from signalprop.lab import grid as G
from signalprop.lab import nets
from signalprop.lab import plotting as P
from signalprop.remedies import get_remedy
from signalprop.theory.torch_adapter import measure_gradient_profile

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 3
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
    "signalprop.theory, is held against a measurement in a wide random net, and the first/output "
    "gradient ratio at initialisation must exceed 1: gradients explode with depth), SGD on "
    "scikit-learn digits (sweep runner). RNN: nn.RNN (tanh) with 32 hidden units, recurrent "
    "weights N(0, 1.5^2/H), a linear read-out of the last state, SGD with batch 32 on the adding "
    "problem (inputs: uniform values and two markers, one in each half; target: the sum of the "
    "two marked values; MSE; predicting the mean scores 1/6), trained by signalprop.train.fit; "
    "the probe's through-time record gives ||dL/dh_1|| / ||dL/dh_T|| at initialisation (> 1: "
    "exploding back through time) and the global gradient norm before clipping. Methods "
    "(remedy registry names): none; clip_norm (1.0); clip_value (0.1); agc (lambda 0.01, output "
    "layer excluded); and lower_lr (no clipping at a 10x smaller rate than the largest of the "
    "grid: does clipping beat just stepping less?). Rate policy: every method trains at every "
    "rate of a grid (wide enough upwards for clipping to use larger rates; a best rate at the "
    "grid's edge is flagged) and is compared at its own best rate (lowest mean final loss; a "
    "diverged run counts as chance, ln 10 for the MLP, 1/6 for the RNN); metric: final training "
    "loss (MLP) / test MSE (RNN), Welch 95% intervals over seeds (3 quick, 5 full); divergence "
    "(the package's one policy: a non-finite loss or gradient, or a loss above 100x max(initial, "
    "1)) is compared at the largest rate with Newcombe 95% intervals."
)
REFERENCES = [
    "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks",
    "Brock, De, Smith & Simonyan 2021, High-performance large-scale image recognition without "
    "normalization (AGC)",
    "Hochreiter & Schmidhuber 1997 (the adding problem)",
]
CAPTIONS = {
    "clipping_divergence": "Fraction of seeds that diverged, per clipping method (Wilson 95% "
    "intervals), for the exploding MLP and the vanilla RNN at the largest rate of their grids.",
    "clipping_loss": "Final loss per clipping method at its best rate (one dot per seed; "
    "diverged runs drawn at the top as crosses).",
}

METHODS = ("none", "norm", "value", "agc")
#: No clipping at a 10x smaller rate than the largest of the grid (remedy ``lower_lr``).
SLOW = "none, lr/10"
#: method -> remedy registry name (``None``: no remedy)
REMEDY_NAMES: dict[str, str | None] = {"none": None, "norm": "clip_norm", "value": "clip_value",
                                       "agc": "agc", SLOW: "lower_lr"}
#: Tolerance on the measured chi_1 (per-layer growth of the squared gradient norm).
CHI_TOL = 0.10


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {
    "mlp": {"data": "digits", "depth": 4, "width": 32, "activation": "tanh", "init": "lecun",
            "init_scale": 3.0, "steps": 30, "batch_size": 64},
    "mlp_seeds": 3, "mlp_lrs": [0.1], "profile_width": 64,
    "rnn": {"hidden": 16, "length": 10, "gain": 1.5, "steps": 30, "batch_size": 16,
            "test_size": 100},
    "rnn_lrs": [0.05], "rnn_seeds": [0, 1],
}


def get_config(quick: bool) -> dict[str, Any]:
    return {
        "mlp": {
            "data": "digits", "depth": 12 if quick else 20, "width": 64, "activation": "tanh",
            "init": "lecun", "init_scale": 3.0, "steps": 300 if quick else 1000,
            "batch_size": 64,
        },
        # wide upwards: clipping caps the step, so a clipped net may want a larger rate
        "mlp_lrs": ([0.03, 0.1, 0.3, 1.0, 3.0] if quick
                    else [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]),
        "mlp_seeds": 3 if quick else 5,
        "profile_width": 256 if quick else 512,
        "thresholds": {"norm": 1.0, "value": 0.1, "agc": 0.01},
        "rnn": {
            "hidden": 32, "length": 30 if quick else 60, "gain": 1.5,
            "steps": 300 if quick else 1000, "batch_size": 32, "test_size": 1000,
        },
        "rnn_lrs": [0.015, 0.05] if quick else [0.015, 0.05, 0.15],
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
        "axes": {"method": variants, "lr": list(config["mlp_lrs"])},
        "seeds": config["mlp_seeds"],
    }
    rows = G.run_grid(grid, workdir, "mlp", **G.grid_options(config))
    return [{"method": r["method"], "lr": r["lr"], "seed": r["seed"], "status": r["status"],
             "final_loss": r["train_loss"], "test_accuracy": r["test_accuracy"],
             "grad_ratio_init": r.get("grad_ratio_init")} for r in rows]


def _chi1(config: dict[str, Any]) -> dict[str, Any]:
    """chi_1 of the MLP's set-up: theory vs the per-layer growth measured in a wide random net."""
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


def remedy(method: str, thresholds: dict[str, float]) -> Any:
    """The registry's remedy for a clipping method (``None`` for no clipping)."""
    name = REMEDY_NAMES[method]
    if name is None:
        return None
    kw = {"norm": {"max_norm": thresholds["norm"]}, "value": {"clip_value": thresholds["value"]},
          "agc": {"clipping": thresholds["agc"]}}.get(method, {})
    return get_remedy(name, **kw)


def time_profile(record: Any, step: int) -> list[float]:
    """||dL/dh_t|| per time step of the record's recurrent layer (``[]`` when absent)."""
    layer = next((n for n in record.layer_names() if n.endswith("rnn")), None)
    if layer is None:
        return []
    return record.time_profile(layer, step)[1].tolist()


def _rnn_one(config: dict[str, Any], method: str, lr: float, seed: int) -> dict[str, Any]:
    c, dev = config["rnn"], config["device"]
    torch.manual_seed(seed)
    net = VanillaRNN(c["hidden"], c["gain"])
    rem = remedy(method, config["thresholds"])
    opt, lr_used, kw = rem.optimizer_config("sgd", lr) if rem is not None else ("sgd", lr, {})
    steps = int(c["steps"])
    # fresh examples every step (one pass over steps x batch examples)
    train = adding_problem(steps * c["batch_size"], c["length"],
                           torch.Generator().manual_seed(seed))
    res = nets.fit(net, train, F.mse_loss, steps=steps, optimizer=opt, lr=lr_used,
              optimizer_kwargs=kw, batch_size=c["batch_size"],
              grad_transform=rem.make_grad_transform() if rem is not None else None,
              probe={"forward": False},
              schedule=lambda s: s % 10 == 0, device=dev, seed=seed)
    xt, yt = adding_problem(c["test_size"], c["length"], torch.Generator().manual_seed(10**6))
    net.eval()
    with torch.no_grad():
        test = float(F.mse_loss(net(xt.to(dev)), yt.to(dev))) if not res.diverged else math.nan
    _, gn = res.record.scalar("grad_norm_total")
    gn = gn[np.isfinite(gn)]
    return {"method": method, "lr": lr, "lr_used": lr_used, "seed": seed,
            "diverged": res.diverged, "diverged_step": res.diverged_step,
            "final_loss": test if math.isfinite(test) else math.nan,
            "max_grad_norm": float(gn.max()) if gn.size else math.nan,
            "grad_t_init": time_profile(res.record, 0),
            "losses": res.losses[:: max(1, len(res.losses) // 100)]}


def _rnn(config: dict[str, Any], workdir: str | Path) -> list[dict[str, Any]]:
    rkey = {"rnn": config["rnn"], "thresholds": config["thresholds"], "device": config["device"]}
    top = max(config["rnn_lrs"])
    todo = [(m, lr) for m in METHODS for lr in config["rnn_lrs"]] + [(SLOW, top)]
    return B.cached_cells(workdir, [B.Cell({**rkey, "method": m, "lr": lr, "seed": s}, _rnn_one,
                                           (config, m, lr, s), tag="rnn")
                                    for m, lr in todo for s in config["rnn_seeds"]],
                          workers=config.get("workers", 1))


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    chi = B.cached(workdir, {"mlp": config["mlp"], "w": config.get("profile_width", 256),
                             "device": config["device"]}, lambda: _chi1(config), tag="chi1")
    return {"mlp": _mlp(config, workdir), "rnn": _rnn(config, workdir),
            "rnn_baseline": 1.0 / 6.0, "chi1": chi, "chance_loss": math.log(10)}


# --- measure ---------------------------------------------------------------------------------
def _diverged(r: dict[str, Any]) -> bool:
    return r["status"] != "done" if "status" in r else bool(r["diverged"])


def _score(r: dict[str, Any], chance: float) -> float:
    return B.capped_loss(r.get("final_loss"), _diverged(r), chance)


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


def divergence(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: diverged seeds, seeds, the rate and the median final loss of the others."""
    out = {}
    for m in (*METHODS, SLOW):
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        div = [_diverged(r) for r in rs]
        fl = [float(r["final_loss"]) for r, d in zip(rs, div, strict=True)
              if not d and r["final_loss"] is not None and math.isfinite(float(r["final_loss"]))]
        out[m] = {"div": int(sum(div)), "div_rate": float(np.mean(div)), "n": len(rs),
                  "final_loss": float(np.median(fl)) if fl else math.nan}
    return out


def at_top_rate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs at the largest rate of the grid (and the lower-rate baseline made from it)."""
    top = max((r.get("lr", 0) for r in rows), default=0)
    return [r for r in rows if r.get("lr", 0) == top or r["method"] == SLOW]


def _measure_part(rows: list[dict[str, Any]], chance: float, part: str) -> dict[str, Any]:
    """A part's effects: clip norm - none at each one's best rate, divergence at the largest rate,
    and every method's best rate (flagged when it is the edge of the grid)."""
    if not any(r["method"] == "none" for r in rows):
        return {}
    grid = sorted({r["lr"] for r in rows if r["method"] in METHODS})
    best = {m: best_rate_losses(rows, m, chance) for m in (*METHODS, SLOW)
            if any(r["method"] == m for r in rows)}
    loss = E.diff_effect(best["norm"][1], best["none"][1],
                         f"{part} final loss, clip norm - none (each at its best rate)")
    s = divergence(at_top_rate(rows))
    div = E.rate_diff_effect(s["norm"]["div"], s["norm"]["n"], s["none"]["div"],
                             s["none"]["n"], f"{part} divergence at lr {B.fmt(grid[-1])}, "
                             "clip norm - none")
    edge = [m for m in METHODS if m in best and len(grid) > 1 and best[m][0] == grid[-1]]
    return {"loss": loss, "div": div, "best": best, "top": s, "edge": edge, "grid": grid}


def _explodes(data: dict[str, Any]) -> dict[str, E.Effect]:
    """Set-up checks: gradients grow towards the input (MLP, first/output ratio at init) and
    back through time (RNN, ||dL/dh_1|| / ||dL/dh_T|| at init), as log10 with 95% intervals."""
    out = {}
    g = [float(r["grad_ratio_init"]) for r in data["mlp"] if r["method"] == "none"
         and r.get("grad_ratio_init") is not None and float(r["grad_ratio_init"]) > 0]
    if g:
        out["mlp"] = E.mean_effect(np.log10(g), "MLP log10 ||dL/dW_first||/||dL/dW_out|| at "
                                   "init")
    t = [math.log10(r["grad_t_init"][0] / r["grad_t_init"][-1]) for r in data["rnn"]
         if r["method"] == "none" and len(r.get("grad_t_init") or []) > 1
         and r["grad_t_init"][0] > 0 and r["grad_t_init"][-1] > 0]
    if t:
        out["rnn"] = E.mean_effect(t, "RNN log10 ||dL/dh_1||/||dL/dh_T|| at init")
    return out


def measure(data: dict[str, Any]) -> dict[str, Any]:
    """The numbers the conclusion quotes (effects with intervals, set-up checks)."""
    chance = float(data.get("chance_loss", math.log(10)))
    out: dict[str, Any] = {"explodes": _explodes(data)}
    chi = (data.get("chi1") or {}).get("runs") or []
    if chi:
        out["chi"] = E.theory_check(
            "chi_1 (per-layer growth of the squared gradient norm)", chi[0]["predicted"],
            float(np.mean([c["measured"] for c in chi])), CHI_TOL)
    out["mlp"] = _measure_part(data["mlp"], chance, "MLP")
    out["rnn"] = _measure_part(data["rnn"], float(data.get("rnn_baseline", 1 / 6)), "RNN")
    return out


# --- say -------------------------------------------------------------------------------------
def _say_part(m: dict[str, Any], part: str, key: str, nums: dict[str, Any]) -> tuple[str, str]:
    """(sentence, verdict) of one part: clipping must prevent divergence where the unclipped net
    diverges, and must not end worse than no clipping at each one's best rate."""
    loss, div, s = m["loss"], m["div"], m["top"]
    vl, vd = E.verdict(loss, -1), E.verdict(div, -1)
    if s["none"]["div"] == 0 and s["norm"]["div"] == 0:
        vd = B.INCONCLUSIVE  # nothing diverged: there was nothing to prevent
    for e in (loss, div):
        nums.update(E.numbers(e))
    for meth, (lr, sc) in m["best"].items():
        nums[f"{part}: best lr, {meth}"] = lr
        nums[f"{part}: {key} at best lr, {meth}"] = float(np.mean(sc)) if sc else math.nan
    best = ", ".join(f"{meth} {B.fmt(float(np.mean(sc)) if sc else math.nan)} (lr {B.fmt(lr)})"
                     for meth, (lr, sc) in m["best"].items())
    divs = ", ".join(f"{meth} {st['div']}/{st['n']}" for meth, st in s.items())
    text = (f"{key} at each method's best rate: {best}; {E.describe(loss, vl)}"
            + (" (clipping ended WORSE than choosing the rate)" if vl == B.CONTRADICTS else "")
            + f". Diverged at the largest rate: {divs}; {E.describe(div, vd, B.pct)}"
            + (" (clipping did NOT reduce divergence)" if vd == B.CONTRADICTS else "") + ".")
    if m["edge"]:
        text += (f" Best rate at the top of the grid for {', '.join(m['edge'])}: a larger rate "
                 "might do better.")
    # the claim is about divergence; a clipped net that ends worse at its best rate contradicts
    # "taming" even when nothing diverged
    v = B.CONTRADICTS if B.CONTRADICTS in (vl, vd) else (
        B.SUPPORTS if B.SUPPORTS in (vl, vd) else B.INCONCLUSIVE)
    return text, v


def _say_setup(m: dict[str, Any], nums: dict[str, Any]) -> tuple[list[str], dict[str, bool]]:
    """Sentences on the set-up checks and, per part, whether its gradients really explode."""
    out, ok = [], {}
    if "chi" in m:
        nums["chi_1 theory check"] = m["chi"].to_dict()
        out.append("Theory vs measurement (MLP set-up): " + m["chi"].text() + ".")
    for part, e in m["explodes"].items():
        v = E.verdict(e, +1)
        ok[part] = v == B.SUPPORTS
        nums.update(E.numbers(e))
        out.append(f"Exploding-gradient check: {E.describe(e, v)}"
                   + ("." if ok[part] else ": NOT exploding, so this part cannot test the "
                      "claim."))
    return out, ok


def conclude(data: dict[str, Any]) -> B.Conclusion:
    m = measure(data)
    nums: dict[str, Any] = {}
    details, ok = _say_setup(m, nums)
    verdicts, parts = [], []
    for part, key, label in (("mlp", "final training loss", "MLP (chaotic tanh, exploding "
                                                            "with depth)"),
                             ("rnn", "test MSE", "RNN (adding problem)")):
        if not m[part]:
            continue
        text, v = _say_part(m[part], part.upper(), key, nums)
        if not ok.get(part, True):
            v = B.INCONCLUSIVE
        parts.append(f"{label}: {text}")
        verdicts.append(v)
    details = parts + details
    verdict = B.combine_verdicts(verdicts)
    sentence = " ".join(parts) or "No runs to compare."
    return B.conclusion(CLAIM, sentence, verdict, nums, details)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    out = []
    parts = (("MLP (chaotic tanh)", data["mlp"], math.log(10)),
             ("vanilla RNN, adding problem", data["rnn"], float(data.get("rnn_baseline", 1 / 6))))
    colors = [P.PLAIN, P.NORMED, P.THIRD, P.FOURTH, "#ff7f0e"]
    fig, axes = P.subplots(1, 2, size=(4.2, 3.3), sharey=True)
    for ax, (title, rows, _) in zip(axes[0], parts, strict=True):
        s = divergence(at_top_rate(rows))
        ms = [m for m in (*METHODS, SLOW) if m in s]
        effs = [E.rate_effect(s[m]["div"], s[m]["n"], m) for m in ms]
        ax.bar(ms, [s[m]["div_rate"] for m in ms], color=(colors * 2)[: len(ms)])
        P.errorbars(ax, range(len(ms)), effs, color="#333333", ls="none")
        for i, m in enumerate(ms):
            ax.text(i, s[m]["div_rate"] + 0.02, f"{s[m]['div']}/{s[m]['n']}", ha="center",
                    fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("clipping method")
        ax.set_ylabel("fraction of seeds diverged")
        ax.set_title(f"{title}, largest rate")
    out.append(P.save(fig, d / "clipping_divergence.png"))
    fig, axes = P.subplots(1, 2, size=(4.2, 3.3))
    for ax, (title, rows, chance) in zip(axes[0], parts, strict=True):
        for i, m in enumerate((*METHODS, SLOW)):
            lr, sc = best_rate_losses(rows, m, chance)
            for j, v in enumerate(sc):
                x = i + (j - len(sc) / 2) * 0.05
                ax.plot(x, v, "x" if v >= chance else "o", color=colors[i], ms=5)
        ax.axhline(chance, color="#555", ls=":", lw=1, label="chance / predict the mean")
        ax.legend(loc="lower right", fontsize=7)
        ax.set_xticks(range(len(METHODS) + 1))
        ax.set_xticklabels([*METHODS, "lr/10"])
        ax.set_yscale("log")
        ax.set_xlabel("clipping method (x = diverged or no better than chance)")
        ax.set_ylabel("final training loss" if rows is data["mlp"] else "final test MSE")
        ax.set_title(f"{title}, best rate each")
    out.append(P.save(fig, d / "clipping_loss.png"))
    return out
