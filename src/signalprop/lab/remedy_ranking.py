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

from signalprop.lab import evidence as E
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
VERSION = 2
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
    "variance), SGD lr 0.1. Exploding case: the clipping study's chaotic tanh MLP (sigma_w = 3, "
    "chi_1 ~ 1.9: gradients grow with depth towards the input), SGD lr 0.1. Measures change one "
    "thing: relu / leaky_relu / elu (with He init, the ReLU family's own initialisation), batch "
    "norm before each activation, lr / 10 with 10x the steps (the same lr x steps budget, so a "
    "lower rate is not penalised by construction), residual connections, Xavier "
    "initialisation, clipping by global norm 1, a quarter of the layers, weight decay 5e-4. Data: "
    "scikit-learn digits, batch 64. Score: final training loss, with a diverged or worse-than-"
    "chance run counted at the chance level ln(10); 3 seeds quick, 5 full. A measure 'helped' "
    "when the Welch 95% interval of (treated - untreated) score lies wholly below -10% of the "
    "untreated score, 'did not help' when it lies wholly above that line, 'no decision' "
    "otherwise; the verdict counts agreement with the textbook table among the "
    "decided measures (Wilson 95% interval of the agreement rate against one half). Each "
    "textbook expectation names its source (SOURCES)."
)
REFERENCES = [
    "Glorot & Bengio 2010; He et al. 2015; Ioffe & Szegedy 2015; He et al. 2016",
    "Pascanu, Mikolov & Bengio 2013 (clipping, weight regularisation)",
    "Goodfellow, Bengio & Courville 2016, Deep Learning, chapter 8",
]
CAPTIONS = {
    "remedies_ranked": "Final training loss per measure (mean over seeds, bars: 95% t interval), "
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
#: Where each textbook expectation comes from.
SOURCES: dict[str, dict[str, str]] = {
    "vanishing": {
        "relu": "Glorot, Bordes & Bengio 2011; He et al. 2015",
        "leaky_relu": "Maas et al. 2013", "elu": "Clevert et al. 2016",
        "batch norm": "Ioffe & Szegedy 2015", "lower lr": "Goodfellow et al. 2016, 8.2",
        "residual": "He et al. 2016", "xavier": "Glorot & Bengio 2010",
        "clip norm": "Pascanu et al. 2013 (clipping addresses exploding, not vanishing)",
        "fewer layers": "Hochreiter 1991; Bengio et al. 1994 (the product shrinks with depth)",
        "weight decay": "Pascanu et al. 2013 (regularisation for exploding, not vanishing)",
    },
    "exploding": {
        "batch norm": "Ioffe & Szegedy 2015", "lower lr": "Goodfellow et al. 2016, 8.2",
        "xavier": "Glorot & Bengio 2010", "clip norm": "Pascanu et al. 2013",
        "fewer layers": "Bengio et al. 1994", "weight decay": "Pascanu et al. 2013, 3.3",
    },
}


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {
    "steps": 30, "seeds": 3, "width": 32,
    "vanishing": {"activation": "sigmoid", "depth": 4, "init": "lecun",
                  "init_scale": 1 / math.sqrt(3), "lr": 0.1},
    "exploding": {"activation": "tanh", "depth": 4, "init": "lecun", "init_scale": 3.0,
                  "lr": 0.1},
}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "data": "digits",
        "width": 64,
        "batch_size": 64,
        "steps": 200 if quick else 600,
        "seeds": 3 if quick else 5,
        "vanishing": {"activation": "sigmoid", "depth": 16 if quick else 30,
                      "init": "lecun", "init_scale": 1 / math.sqrt(3), "lr": 0.1},
        "exploding": {"activation": "tanh", "depth": 12 if quick else 20,
                      "init": "lecun", "init_scale": 3.0, "lr": 0.1},
        "weight_decay": 5e-4,
        "clip_norm": 1.0,
        "device": "cpu",
    }


def measures(case: str, base: dict[str, Any], config: dict[str, Any]) -> dict[str, dict]:
    """Overrides of the base run config, one per measure (``untreated`` first)."""
    m: dict[str, dict[str, Any]] = {"untreated": {}}
    for act in ("relu", "leaky_relu", "elu"):
        if act != base["activation"]:
            # the ReLU family comes with its own (He) initialisation
            m[act] = {"activation": act, "init": "kaiming", "init_scale": 1.0}
    m["batch norm"] = {"norm": "batch"}
    # the same lr x steps budget: a lower rate is not penalised by a fixed step count
    m["lower lr"] = {"lr": base["lr"] / 10, "steps": 10 * int(config["steps"])}
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
    """One entry per measure: mean score with its 95% t interval, per-seed scores, test accuracy,
    divergences; sorted best first."""
    out = []
    for m in dict.fromkeys(r["measure"] for r in rows):
        rs = [r for r in rows if r["measure"] == m]
        sc = np.asarray([score(r, chance) for r in rs])
        e = E.mean_effect(sc)
        acc = [float(r["test_accuracy"]) for r in rs if r["status"] == "done"
               and r["test_accuracy"] is not None and math.isfinite(float(r["test_accuracy"]))]
        gr = [float(r["grad_ratio_init"]) for r in rs if r["grad_ratio_init"] is not None
              and math.isfinite(float(r["grad_ratio_init"])) and float(r["grad_ratio_init"]) > 0]
        out.append({"measure": m, "score": float(sc.mean()), "scores": sc.tolist(),
                    "lo": e.lo if math.isfinite(e.lo) else float(sc.min()),
                    "hi": e.hi if math.isfinite(e.hi) else float(sc.max()),
                    "test_acc": float(np.mean(acc)) if acc else math.nan,
                    "diverged": sum(r["status"] != "done" for r in rs), "n": len(rs),
                    "grad_ratio_init": float(np.exp(np.mean(np.log(gr)))) if gr else math.nan})
    return sorted(out, key=lambda e: e["score"])


def effect(entry: dict[str, Any], base: dict[str, Any]) -> E.Effect:
    """Treated - untreated score over seeds (Welch 95% interval; < 0 helped)."""
    return E.diff_effect(entry["scores"], base["scores"], f"{entry['measure']} - untreated")


#: A measure "helps" when it lowers the untreated network's mean score by at least this fraction.
HELP_MARGIN = 0.10


def helped(entry: dict[str, Any], base: dict[str, Any]) -> bool | None:
    """True when the whole 95% interval of (treated - untreated) lies below -HELP_MARGIN x the
    untreated score (it helped by at least the margin), False when the whole interval lies above
    that line (it cannot have helped that much), ``None`` when the interval straddles it."""
    e = effect(entry, base)
    line = -HELP_MARGIN * base["score"]
    if not (math.isfinite(e.lo) and math.isfinite(e.hi)):
        return None
    if e.hi < line:
        return True
    if e.lo > line:
        return False
    return None


def conclude(data: dict[str, Any]) -> Conclusion:
    chance = float(data["chance_loss"])
    nums: dict[str, Any] = {}
    details: list[str] = []
    matched, decided, undecided, mismatches = 0, 0, [], []
    for case in ("vanishing", "exploding"):
        t = table(data[case], chance)
        base = next((e for e in t if e["measure"] == "untreated"), None)
        if base is None:
            continue
        nums[f"{case}: untreated loss"] = base["score"]
        ranked = [e for e in t if e["measure"] != "untreated"]
        nums[f"{case}: ranking"] = ", ".join(
            f"{e['measure']} {fmt(e['score'])}" for e in ranked)
        good = [e["measure"] for e in ranked if helped(e, base) is True]
        details.append(
            f"{case.capitalize()} network (untreated loss {fmt(base['score'])}, "
            f"{base['diverged']}/{base['n']} diverged): best "
            f"{', '.join(e['measure'] + ' ' + fmt(e['score']) for e in ranked[:3])}; helped "
            f"(95% interval of the loss change below -{pct(HELP_MARGIN)} of the untreated loss): "
            f"{', '.join(good) or 'nothing'}."
        )
        for e in ranked:
            eff = effect(e, base)
            nums[f"{case}: {e['measure']} - untreated"] = eff.estimate
            nums[f"{case}: {e['measure']} - untreated 95% CI"] = [eff.lo, eff.hi]
            exp = TEXTBOOK[case].get(e["measure"])
            if exp is None:
                continue
            got = helped(e, base)
            if got is None:
                # "does not help" is the textbook's expectation and no change was measured:
                # that agrees only when the interval is narrow; count it as undecided
                undecided.append(f"{e['measure']} ({case})")
                continue
            decided += 1
            if got == exp:
                matched += 1
            else:
                mismatches.append(
                    f"{e['measure']} {'helped' if got else 'did NOT help'} the {case} "
                    f"network ({E.describe(eff, SUPPORTS if got else CONTRADICTS)}), contrary to "
                    f"the textbook ({SOURCES[case].get(e['measure'], 'textbook')})"
                )
    agree = E.rate_effect(matched, decided, "agreement with the textbook", null=0.5)
    verdict = E.verdict(agree, +1) if decided else INCONCLUSIVE
    nums["textbook expectations matched (decided)"] = f"{matched}/{decided}"
    nums.update(E.numbers(agree))
    nums["undecided measures"] = len(undecided)
    sentence = (
        f"{matched} of {decided} decided textbook expectations hold "
        f"({E.describe(agree, verdict, pct)}); for {len(undecided)} measures the 95% interval "
        f"of the loss change straddles the {pct(HELP_MARGIN)} line (no decision). " + " ".join(details)
    )
    if mismatches:
        sentence += " Against the textbook: " + "; ".join(mismatches) + "."
        details += mismatches
    if undecided:
        details.append("No decision (interval includes no effect): " + ", ".join(undecided) + ".")
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
        colors = [P.NORMED if base and e is not base and helped(e, base) else
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
