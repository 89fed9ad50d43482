"""Which of the usual measures against vanishing/exploding gradients actually help, and when?

The usual list (ReLU family, batch norm, a lower learning rate, skip connections, Xavier
initialisation, gradient clipping, fewer layers, weight decay) is applied one at a time to two
broken networks: a deep sigmoid MLP whose gradients vanish (default-variance initialisation) and a
deep ReLU MLP whose gradients explode (He initialisation times 1.5). Each variant is trained from
several seeds (sweep runner); the table ranks the measures by the loss they reach, and compares
"helped / did not help" with what the textbooks say each measure is for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from signalprop.lab import plotting as P
from signalprop.lab.base import (
    CONTRADICTS,
    INCONCLUSIVE,
    SUPPORTS,
    Conclusion,
    conclusion,
    fmt,
    pct,
)
from signalprop.lab.grid import grid_options, run_grid

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 1
NAME = "remedies"
TITLE = "The usual remedies, ranked by measurement"
QUESTION = (
    "Which of the usual measures (ReLU family, batch norm, lower learning rate, skip "
    "connections, Xavier, clipping, fewer layers, weight decay) actually help, and when?"
)
CLAIM = (
    "Against vanishing gradients, ReLU-family activations, batch norm, skip connections, Xavier "
    "initialisation and fewer layers help, while a lower learning rate, clipping and weight "
    "decay do not; against exploding gradients, batch norm, a lower learning rate, Xavier (a "
    "smaller initial scale), clipping, fewer layers and weight decay help."
)
SETUP = (
    "Vanishing case: sigmoid MLP, deep, width 64, weights N(0, 1/(3 fan_in)) (PyTorch's default "
    "variance), SGD lr 0.1. Exploding case: ReLU MLP, deep, width 64, He init x 1.5, SGD lr "
    "0.1. Measures change one thing: relu / leaky_relu / elu (on the sigmoid network with He "
    "init, the ReLU family's own initialisation; on the exploding network only the "
    "activation), batch norm before each activation, lr / 10, residual connections, Xavier "
    "initialisation, clipping by global norm 1, a quarter of the layers, weight decay 5e-4. Data: "
    "scikit-learn digits, batch 64. Score: final training loss, with a diverged or worse-than-"
    "chance run counted at the chance level ln(10). A measure 'helped' when its mean score is at "
    "least 10% below the untreated network's."
)
REFERENCES = [
    "Glorot & Bengio 2010; He et al. 2015; Ioffe & Szegedy 2015; He et al. 2016",
    "Pascanu, Mikolov & Bengio 2013 (clipping, weight regularisation)",
    "Goodfellow, Bengio & Courville 2016, Deep Learning, chapter 8",
]
CAPTIONS = {
    "remedies_ranked": "Final training loss per measure (mean over seeds, bars: min-max), "
    "sorted; dashed line: the untreated network; dotted: chance level.",
    "remedies_effect": "Effect of each measure: log10(untreated loss / treated loss) for the "
    "vanishing and the exploding network (> 0: helped).",
}

#: The textbook expectation per case: True = "helps", False = "does not help".
TEXTBOOK: dict[str, dict[str, bool]] = {
    "vanishing": {
        "relu": True, "leaky_relu": True, "elu": True, "batch norm": True, "lower lr": False,
        "residual": True, "xavier": True, "clip norm": False, "fewer layers": True,
        "weight decay": False,
    },
    "exploding": {
        "batch norm": True, "lower lr": True, "xavier": True, "clip norm": True,
        "fewer layers": True, "weight decay": True,
    },
}
HELP_MARGIN = 0.10


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {
    "steps": 30, "seeds": 1, "width": 32,
    "vanishing": {"activation": "sigmoid", "depth": 4, "init": "lecun",
                  "init_scale": 1 / math.sqrt(3), "lr": 0.1},
    "exploding": {"activation": "relu", "depth": 4, "init": "kaiming", "init_scale": 1.5,
                  "lr": 0.1},
}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "data": "digits",
        "width": 64,
        "batch_size": 64,
        "steps": 300 if quick else 1000,
        "seeds": 2 if quick else 4,
        "vanishing": {"activation": "sigmoid", "depth": 16 if quick else 30,
                      "init": "lecun", "init_scale": 1 / math.sqrt(3), "lr": 0.1},
        "exploding": {"activation": "relu", "depth": 12 if quick else 20,
                      "init": "kaiming", "init_scale": 1.5, "lr": 0.1},
        "weight_decay": 5e-4,
        "clip_norm": 1.0,
        "device": "cpu",
    }


def measures(case: str, base: dict[str, Any], config: dict[str, Any]) -> dict[str, dict]:
    """Overrides of the base run config, one per measure (``untreated`` first)."""
    m: dict[str, dict[str, Any]] = {"untreated": {}}
    for act in ("relu", "leaky_relu", "elu"):
        if act != base["activation"]:
            # vanishing (sigmoid) network: the ReLU family comes with its own (He) init; the
            # exploding network is already ReLU + He x 1.5: only the activation changes
            m[act] = ({"activation": act} if case == "exploding"
                      else {"activation": act, "init": "kaiming", "init_scale": 1.0})
    m["batch norm"] = {"norm": "batch"}
    m["lower lr"] = {"lr": base["lr"] / 10}
    m["residual"] = {"residual": True}
    m["xavier"] = {"init": "xavier", "init_scale": 1.0}
    m["clip norm"] = {"clip": "norm", "clip_threshold": config["clip_norm"]}
    m["fewer layers"] = {"depth": max(1, base["depth"] // 4)}
    m["weight decay"] = {"weight_decay": config["weight_decay"]}
    return m


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    out = {}
    for case in ("vanishing", "exploding"):
        base = dict(config[case])
        grid = {
            "base": {"data": config["data"], "width": config["width"],
                     "batch_size": config["batch_size"], "steps": config["steps"],
                     "optimizer": "sgd", "record_every": 0, "device": config["device"], **base},
            "axes": {"measure": measures(case, base, config)},
            "seeds": config["seeds"],
        }
        rows = run_grid(grid, workdir, case, **grid_options(config))
        out[case] = [{"measure": r["measure"], "seed": r["seed"], "status": r["status"],
                      "train_loss": r["train_loss"], "test_accuracy": r["test_accuracy"],
                      "grad_ratio_init": r["grad_ratio_init"]} for r in rows]
    out["chance_loss"] = math.log(10)
    return out


def score(row: dict[str, Any], chance: float) -> float:
    """Final training loss, with divergence (or a worse-than-chance loss) counted as chance."""
    v = row.get("train_loss")
    if row.get("status") != "done" or v is None or not math.isfinite(float(v)):
        return chance
    return min(float(v), chance)


def table(rows: list[dict[str, Any]], chance: float) -> list[dict[str, Any]]:
    """One entry per measure: mean/min/max score, test accuracy, divergences; sorted best first."""
    out = []
    for m in dict.fromkeys(r["measure"] for r in rows):
        rs = [r for r in rows if r["measure"] == m]
        sc = np.asarray([score(r, chance) for r in rs])
        acc = [float(r["test_accuracy"]) for r in rs if r["status"] == "done"
               and r["test_accuracy"] is not None and math.isfinite(float(r["test_accuracy"]))]
        gr = [float(r["grad_ratio_init"]) for r in rs if r["grad_ratio_init"] is not None
              and math.isfinite(float(r["grad_ratio_init"])) and float(r["grad_ratio_init"]) > 0]
        out.append({"measure": m, "score": float(sc.mean()), "lo": float(sc.min()),
                    "hi": float(sc.max()), "test_acc": float(np.mean(acc)) if acc else math.nan,
                    "diverged": sum(r["status"] != "done" for r in rs), "n": len(rs),
                    "grad_ratio_init": float(np.exp(np.mean(np.log(gr)))) if gr else math.nan})
    return sorted(out, key=lambda e: e["score"])


def helped(entry: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether a measure lowered the untreated network's mean score by at least HELP_MARGIN."""
    return entry["score"] < base["score"] * (1 - HELP_MARGIN)


def conclude(data: dict[str, Any]) -> Conclusion:
    chance = float(data["chance_loss"])
    nums: dict[str, Any] = {}
    details: list[str] = []
    matched, total, mismatches = 0, 0, []
    for case in ("vanishing", "exploding"):
        t = table(data[case], chance)
        base = next((e for e in t if e["measure"] == "untreated"), None)
        if base is None:
            continue
        nums[f"{case}: untreated loss"] = base["score"]
        ranked = [e for e in t if e["measure"] != "untreated"]
        nums[f"{case}: ranking"] = ", ".join(
            f"{e['measure']} {fmt(e['score'])}" for e in ranked)
        good = [e["measure"] for e in ranked if helped(e, base)]
        details.append(
            f"{case.capitalize()} network (untreated loss {fmt(base['score'])}, "
            f"{base['diverged']}/{base['n']} diverged): best {', '.join(e['measure'] + ' ' + fmt(e['score']) for e in ranked[:3])}; "
            f"helped: {', '.join(good) or 'nothing'}."
        )
        for e in ranked:
            exp = TEXTBOOK[case].get(e["measure"])
            if exp is None:
                continue
            total += 1
            got = helped(e, base)
            if got == exp:
                matched += 1
            else:
                mismatches.append(
                    f"{e['measure']} {'helped' if got else 'did NOT help'} the {case} network "
                    f"({fmt(e['score'])} vs {fmt(base['score'])}), contrary to the textbook"
                )
    frac = matched / total if total else math.nan
    nums["textbook expectations matched"] = f"{matched}/{total}"
    if not total:
        verdict = INCONCLUSIVE
    elif frac >= 0.75:
        verdict = SUPPORTS
    elif frac < 0.5:
        verdict = CONTRADICTS
    else:
        verdict = INCONCLUSIVE
    sentence = (
        f"{matched} of {total} textbook expectations hold ({pct(frac)}). " + " ".join(details)
    )
    if mismatches:
        sentence += " Against the textbook: " + "; ".join(mismatches) + "."
        details += mismatches
    return conclusion(CLAIM, sentence, verdict, nums, details)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    chance = float(data["chance_loss"])
    out = []
    fig, axes = P.subplots(1, 2, size=(4.8, 3.8))
    effects = {}
    for ax, case in zip(axes[0], ("vanishing", "exploding"), strict=True):
        t = table(data[case], chance)
        base = next((e for e in t if e["measure"] == "untreated"), None)
        y = np.arange(len(t))
        s = np.asarray([e["score"] for e in t])
        colors = [P.NORMED if base and helped(e, base) else
                  ("#888888" if e["measure"] == "untreated" else P.PLAIN) for e in t]
        ax.barh(y, s, xerr=[s - np.asarray([e["lo"] for e in t]),
                            np.asarray([e["hi"] for e in t]) - s], color=colors, capsize=2)
        ax.set_yticks(y)
        ax.set_yticklabels([e["measure"] + (f" ({e['diverged']}/{e['n']} div.)"
                                            if e["diverged"] else "") for e in t])
        ax.invert_yaxis()
        ax.set_xscale("log")
        if base:
            ax.axvline(base["score"], color="k", ls="--", lw=0.8)
            effects[case] = {e["measure"]: math.log10(base["score"] / max(e["score"], 1e-12))
                             for e in t if e["measure"] != "untreated"}
        ax.axvline(chance, color="#555", ls=":", lw=1)
        ax.set_xlabel("final training loss (blue: helped)")
        ax.set_title(f"{case} network")
    out.append(P.save(fig, d / "remedies_ranked.png"))
    fig, axes = P.subplots(1, 1, size=(6.4, 3.6))
    ax = axes[0, 0]
    names = list(dict.fromkeys(m for c in effects.values() for m in c))
    x = np.arange(len(names))
    for k, (case, c) in enumerate(effects.items()):
        ax.bar(x + (k - 0.5) * 0.4, [c.get(n, np.nan) for n in names], width=0.4,
               color=P.PLAIN if case == "vanishing" else P.NORMED, label=f"{case} network")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("log10(untreated loss / treated loss)")
    ax.set_title("Measured effect of each measure")
    ax.legend(loc="best")
    out.append(P.save(fig, d / "remedies_effect.png"))
    return out
