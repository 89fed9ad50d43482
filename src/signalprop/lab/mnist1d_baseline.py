"""MNIST-1D reference point: the paper's residual MLP, measured here, next to the paper's table.

Greydanus 2020 ("Scaling down deep learning") reports test accuracies on MNIST-1D of 32% (logistic
regression), 68% (MLP), 94% (CNN) and 91% (GRU). Its MLP is 40 -> 100 ReLU -> residual ReLU block
(h + ReLU(W2 h)) -> 10, trained with Adam (lr 1e-2), batch 100, 6000 steps, on the un-normalised
signals. This study re-trains that MLP on the data set regenerated offline and checks that our
measurement lands near 68%, which anchors the other studies' numbers to a published result.

Reproducibility (root cause of an earlier discrepancy). The README once quoted 66.4% for seed 0
(measured on 2026-11-22); on 2026-11-27 the same code and seed gave 65.1%, reproducibly: two runs
agree to the last digit, and one vs two torch threads give the identical 65.1% (and 62.6% at step
1500), so thread nondeterminism is not the cause, and the study's code and the lab's loop had not
changed between the two measurements. What had changed is the environment: the virtual
environment was rebuilt on 2026-11-27 (torch 2.13.0+cpu, numpy 2.4.6, scipy 1.17.1, mnist1d
0.0.2.post1); the data set is regenerated from its seed through numpy's generator and scipy's
interpolation and the network is initialised by torch's generator, and the earlier versions were
not recorded. The study now stores the versions and a SHA-256 fingerprint of the generated data
with its results, so that a future difference can be split into "different data" and "different
training". (Since 2026-11-27 the network is the engine's MLP trained by signalprop.train.fit, so
its numbers differ from both earlier ones.)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from signalprop.data import load_dataset
from signalprop.engine import MLP
from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import nets
from signalprop.lab import plotting as P

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 3
NAME = "mnist1d-baseline"
TITLE = "MNIST-1D reference point: the paper's residual MLP"
QUESTION = (
    "Do our training loop and data reproduce a published number, so that the other studies can "
    "be trusted?"
)
CLAIM = (
    "The MNIST-1D paper's MLP (40 -> 100 ReLU -> residual ReLU block -> 10; Adam lr 1e-2, batch "
    "100, 6000 steps) reaches about 68% test accuracy (Greydanus 2020, Table 1)."
)
SETUP = (
    "MNIST-1D regenerated offline with the mnist1d package (4000 train / 1000 test, 40 features, "
    "not standardised, as in the paper). The residual MLP is trained with Adam, batch 100; test "
    "accuracy is evaluated along the way. Metric: final test accuracy, mean over seeds with a "
    "95% t interval (3 seeds quick, 5 full); budget 6000 steps; rate policy: the paper's Adam "
    "1e-2. Reproducibility: seed 0 is trained twice in the same process and must give the same "
    "test accuracy at the repeat's step (6000 full, 1500 quick) to 1e-9 (one thread; the data "
    "set is regenerated from its fixed seed)."
)
REFERENCES = ["Greydanus 2020, Scaling down deep learning (MNIST-1D)"]
CAPTIONS = {
    "mnist1d_accuracy": "Test accuracy of the residual MLP vs training step (one line per seed), "
    "the mean over seeds with its 95% interval, and the paper's table as horizontal lines.",
}

#: The paper's table (test accuracy, fraction)
PAPER = {"logistic": 0.32, "mlp": 0.68, "cnn": 0.94, "gru": 0.91}
#: Our measurement counts as reproducing the paper's MLP within this many accuracy points.
TOLERANCE = 0.05


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {"steps": 300, "eval_every": 100, "repeat_steps": 200}


def get_config(quick: bool) -> dict[str, Any]:
    return {
        "steps": 6000,
        "batch_size": 100,
        "lr": 1e-2,
        "width": 100,
        "seeds": [0, 1, 2, 3, 4] if not quick else [0, 1, 2],
        "eval_every": 250,
        "repeat_steps": 1500 if quick else 6000,
        "standardize": False,
        "device": "cpu",
    }


def _one(config: dict[str, Any], seed: int) -> dict[str, Any]:
    data = load_dataset("mnist1d", standardize=config["standardize"]).to(config["device"])
    torch.manual_seed(seed)
    # the paper's MLP: in -> width ReLU -> residual ReLU block -> head (PyTorch's default init)
    model = MLP(data.in_features, 10, depth=2, width=config["width"], activation="relu",
                residual=True)
    res, steps, accs = nets.train(model, data, steps=config["steps"], lr=config["lr"],
                                  batch_size=config["batch_size"], seed=seed,
                                  every=int(config["eval_every"]), optimizer="adam")
    return {
        "seed": seed,
        "eval_steps": steps,
        "test_acc": accs,
        "final_test_acc": accs[-1] if not res.diverged else float("nan"),
        "best_test_acc": max(accs),
        "final_train_loss": res.final_loss,
        "wall_s": res.wall_time,
    }


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    rest = {k: v for k, v in config.items() if k != "seeds"}
    s0 = config["seeds"][0]
    # the repeat trains seed 0 again for repeat_steps and is compared with the first run's
    # test accuracy evaluated at that step (the same model state if training is deterministic)
    rcfg = {**config, "steps": int(config.get("repeat_steps") or config["steps"])}
    *runs, repeat = B.cached_cells(
        workdir, [*(B.Cell({"seed": s, **rest}, _one, (config, s), tag=f"seed{s}")
                    for s in config["seeds"]),
                  B.Cell({"seed": s0, "repeat": True, **rest}, _one, (rcfg, s0),
                         tag=f"repeat{s0}")],
        workers=config.get("workers", 1))
    repeat["steps"] = rcfg["steps"]
    return {"runs": runs, "repeat": repeat, "paper": PAPER, "steps": config["steps"],
            "environment": environment(config)}


def environment(config: dict[str, Any]) -> dict[str, str]:
    """What the numbers depend on besides the code: package versions and a SHA-256 fingerprint
    of the generated data set (training and test inputs and labels)."""
    data = load_dataset("mnist1d", standardize=config["standardize"])
    h = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    out = {"data_sha256": h.hexdigest()[:16]}
    for pkg in ("torch", "numpy", "scipy", "mnist1d"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def measure(data: dict[str, Any]) -> dict[str, Any]:
    """Mean test accuracy with its interval, and the same-seed repeat's gap to the first run at
    the repeat's step (``None`` when there is no repeat to compare)."""
    paper = float(data["paper"]["mlp"])
    eff = E.mean_effect([r["final_test_acc"] for r in data["runs"]], "test accuracy",
                        null=paper)
    rep, gap = data.get("repeat"), None
    if rep is not None:
        first = next((r for r in data["runs"] if r["seed"] == rep["seed"]), None)
        at = int(rep.get("steps", data["steps"]))
        ref = None
        if first is not None:
            if at >= int(data["steps"]):
                ref = float(first["final_test_acc"])
            elif at in first.get("eval_steps", []):
                ref = float(first["test_acc"][first["eval_steps"].index(at)])
        if ref is not None:
            gap = abs(ref - float(rep["final_test_acc"]))
    return {"paper": paper, "eff": eff, "repeat": rep, "gap": gap}


def conclude(data: dict[str, Any]) -> B.Conclusion:
    m = measure(data)
    eff, paper, gap, rep = m["eff"], m["paper"], m["gap"], m["repeat"]
    nums = {**E.numbers(eff), "steps": int(data["steps"]), "paper MLP": paper,
            "difference (points)": 100 * (eff.estimate - paper), "tolerance (points)":
            100 * TOLERANCE}
    if gap is not None:
        nums["same-seed repeat gap"] = gap
    if not np.isfinite(eff.estimate):
        return B.conclusion(CLAIM, "No finished run to compare with the paper.", B.INCONCLUSIVE,
                            nums)
    verdict = E.within_effect(eff, paper - TOLERANCE, paper + TOLERANCE)
    if verdict == B.CONTRADICTS and eff.lo > paper + TOLERANCE:
        # better than the paper does not show our set-up unsound, but it is not the published
        # number either: say so without over-claiming
        verdict = B.INCONCLUSIVE
    how = {B.SUPPORTS: "reproduces", B.CONTRADICTS: "falls short of",
           B.INCONCLUSIVE: "is not decisively within the tolerance of"}[verdict]
    sentence = (
        f"The residual MLP reaches {E.describe(eff, verdict, B.pct)} on MNIST-1D after "
        f"{data['steps']} steps, which {how} the paper's {B.pct(paper)} (tolerance "
        f"{100 * TOLERANCE:.0f} points: the whole 95% interval must lie within it)."
    )
    details = []
    env = data.get("environment") or {}
    if env:
        details.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".")
    if gap is not None:
        ok = gap <= 1e-9
        details.append(
            f"Re-training seed {rep['seed']} in the same process for "
            f"{rep.get('steps', data['steps'])} steps gives {B.pct(rep['final_test_acc'])} (gap "
            f"{B.fmt(gap)} to the first run at that step)."
            + ("" if ok else " NOT reproducible: the run is non-deterministic."))
        if not ok and verdict == B.SUPPORTS:
            verdict = B.INCONCLUSIVE
    return B.conclusion(CLAIM, sentence, verdict, nums, details)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    fig, axes = P.subplots(1, 1, size=(5.5, 3.6))
    ax = axes[0, 0]
    for r in data["runs"]:
        ax.plot(r["eval_steps"], r["test_acc"], color=P.NORMED, alpha=0.25, lw=0.8)
    n = min(len(r["test_acc"]) for r in data["runs"])
    P.mean_band(ax, data["runs"][0]["eval_steps"][:n], [r["test_acc"][:n] for r in data["runs"]],
                color=P.NORMED, label="residual MLP (this run)")
    styles = {"logistic": ":", "mlp": "--", "cnn": "-.", "gru": (0, (1, 3))}
    for k, v in data["paper"].items():
        ax.axhline(v, color="#555555", ls=styles.get(k, "--"), lw=1, label=f"paper: {k} {B.pct(v)}")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("MNIST-1D: residual MLP vs the paper's table")
    ax.legend(loc="lower right", frameon=True, framealpha=0.9)
    return [P.save(fig, P.figdir(workdir) / "mnist1d_accuracy.png")]
