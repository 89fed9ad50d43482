"""Which of the usual measures against vanishing/exploding gradients actually help, and when?

The usual list (ReLU family, batch norm, a lower learning rate, skip connections, Xavier
initialisation, gradient clipping, fewer layers, weight decay) is applied one at a time to two
broken networks: a deep sigmoid MLP whose gradients vanish (default-variance initialisation) and a
deep chaotic tanh MLP whose gradients explode with depth. Each measure is a remedy of the library's
registry (:data:`signalprop.remedies.REMEDIES`, by name: ``relu``, ``batchnorm``, ``lower_lr``,
``residual``, ``xavier_init``, ``clip_norm``, ``fewer_layers``, ``weight_decay``; leaky ReLU and
ELU through the registry's ``swap_activation`` transform), applied by the library to an
``nn.Sequential`` MLP and trained by the package's loop (:func:`signalprop.train.fit`, one
divergence policy, ``final_loss``) from several seeds; the gradient ratio at initialisation comes
from the probe's record (:func:`signalprop.stats.grad_ratio`). The table ranks the measures by the
loss they reach, and compares "helped / did not help" with what the textbooks say each measure
is for.
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
from signalprop.examples import mlp
from signalprop.init import kaiming_, scale_
from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import nets
from signalprop.lab import plotting as P
from signalprop.remedies import TRANSFORMS, Remedy, get_remedy, make_activation

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 3
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
    "Vanishing case: sigmoid MLP (nn.Sequential), deep, width 64, weights N(0, 1/(3 fan_in)) "
    "(PyTorch's default variance), zero biases, SGD lr 0.1. Exploding case: the clipping study's "
    "chaotic tanh MLP (sigma_w = 3, chi_1 ~ 1.9: gradients grow with depth towards the input), "
    "SGD lr 0.1. Measures change one thing and are remedies of the library's registry, applied "
    "by it: relu / leaky_relu / elu (swap_activation, with kaiming_init: the ReLU family's own "
    "initialisation), batchnorm (before each activation), lower_lr (x 0.1, with 10x the steps: "
    "the same lr x steps budget, so a lower rate is not penalised by construction), residual, "
    "xavier_init, clip_norm (1), fewer_layers (a quarter of the layers), weight_decay (5e-4). "
    "Trained by signalprop.train.fit on scikit-learn digits, batch 64. Score: the loop's final "
    "loss (mean of the last 10 mini-batch losses), with a diverged (the loop's one policy) or "
    "worse-than-chance run counted at the chance level ln(10); 3 seeds quick, 5 full. A measure "
    "'helped' when the Welch 95% interval of (treated - untreated) score lies wholly below -10% "
    "of the untreated score, 'did not help' when it lies wholly above that line, 'no decision' "
    "otherwise; the verdict counts agreement with the textbook table among the decided measures "
    "(Wilson 95% interval of the agreement rate against one half). Each textbook expectation "
    "names its source (SOURCES)."
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

#: The textbook expectation per case and remedy name: True = "helps", False = "does not help".
TEXTBOOK: dict[str, dict[str, bool]] = {
    "vanishing": {
        "relu": True, "leaky_relu": True, "elu": True, "batchnorm": True, "lower_lr": False,
        "residual": True, "xavier_init": True, "clip_norm": False, "fewer_layers": True,
        "weight_decay": False,
    },
    "exploding": {
        "batchnorm": True, "lower_lr": True, "xavier_init": True, "clip_norm": True,
        "fewer_layers": True, "weight_decay": True,
    },
}
#: Where each textbook expectation comes from.
SOURCES: dict[str, dict[str, str]] = {
    "vanishing": {
        "relu": "Glorot, Bordes & Bengio 2011; He et al. 2015",
        "leaky_relu": "Maas et al. 2013", "elu": "Clevert et al. 2016",
        "batchnorm": "Ioffe & Szegedy 2015", "lower_lr": "Goodfellow et al. 2016, 8.2",
        "residual": "He et al. 2016", "xavier_init": "Glorot & Bengio 2010",
        "clip_norm": "Pascanu et al. 2013 (clipping addresses exploding, not vanishing)",
        "fewer_layers": "Hochreiter 1991; Bengio et al. 1994 (the product shrinks with depth)",
        "weight_decay": "Pascanu et al. 2013 (regularisation for exploding, not vanishing)",
    },
    "exploding": {
        "batchnorm": "Ioffe & Szegedy 2015", "lower_lr": "Goodfellow et al. 2016, 8.2",
        "xavier_init": "Glorot & Bengio 2010", "clip_norm": "Pascanu et al. 2013",
        "fewer_layers": "Bengio et al. 1994", "weight_decay": "Pascanu et al. 2013, 3.3",
    },
}
#: The ReLU family: swapped in by the registry's ``swap_activation`` transform, with He init.
RELU_FAMILY = ("relu", "leaky_relu", "elu")
#: The other measures, by remedy registry name.
MEASURES = ("batchnorm", "lower_lr", "residual", "xavier_init", "clip_norm", "fewer_layers",
            "weight_decay")


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {
    "steps": 30, "seeds": 3, "width": 32,
    "vanishing": {"activation": "sigmoid", "depth": 4, "init_scale": 1 / math.sqrt(3),
                  "lr": 0.1},
    "exploding": {"activation": "tanh", "depth": 4, "init_scale": 3.0, "lr": 0.1},
}


def get_config(quick: bool) -> dict[str, Any]:
    return {
        "data": "digits",
        "width": 64,
        "batch_size": 64,
        "steps": 200 if quick else 600,
        "seeds": 3 if quick else 5,
        "vanishing": {"activation": "sigmoid", "depth": 16 if quick else 30,
                      "init_scale": 1 / math.sqrt(3), "lr": 0.1},
        "exploding": {"activation": "tanh", "depth": 12 if quick else 20, "init_scale": 3.0,
                      "lr": 0.1},
        "weight_decay": 5e-4,
        "clip_norm": 1.0,
        "fewer_layers": 0.25,
        "device": "cpu",
    }


def measures(case: dict[str, Any]) -> list[str]:
    """The measures tried on a case (``untreated`` first): remedy names."""
    return ["untreated", *(a for a in RELU_FAMILY if a != case["activation"]), *MEASURES]


def remedy(measure: str, config: dict[str, Any]) -> Remedy | None:
    """The registry's remedy for a measure (``None``: untreated)."""
    if measure == "untreated":
        return None
    if measure in RELU_FAMILY:
        swap = TRANSFORMS.get("swap_activation")
        act = Remedy(measure, lambda m, b: swap(m, b, activation=measure),
                     description=f"swap the activations for {measure}")
        return act + get_remedy("kaiming_init")
    kw = {"clip_norm": {"max_norm": config["clip_norm"]},
          "weight_decay": {"weight_decay": config["weight_decay"]},
          "fewer_layers": {"fraction": config["fewer_layers"]}}.get(measure, {})
    return get_remedy(measure, **kw)


def _model(config: dict[str, Any], case: dict[str, Any], in_f: int, out_f: int) -> nn.Module:
    """The broken network: ``depth`` hidden layers, weights N(0, init_scale^2 / fan_in)."""
    model = mlp(in_f, out_f, case["depth"] + 1, config["width"],
                lambda: make_activation(case["activation"]))
    kaiming_(model, nonlinearity="linear")  # Var W = 1/fan_in, zero biases
    scale_(model, case["init_scale"])
    return model


def _one(config: dict[str, Any], case_name: str, measure: str, seed: int) -> dict[str, Any]:
    case, dev = config[case_name], config["device"]
    data = load_dataset(config["data"])
    torch.manual_seed(seed)
    model = _model(config, case, data.in_features, data.num_classes)
    rem = remedy(measure, config)
    opt, lr, kw, gt, steps = "sgd", case["lr"], {}, None, int(config["steps"])
    if rem is not None:
        model = rem.apply(model, data.x_train[:256])
        opt, lr, kw = rem.optimizer_config("sgd", case["lr"])
        gt = rem.make_grad_transform()
        steps = round(steps / rem.lr_scale)  # the same lr x steps budget for a lower rate
    res = nets.fit(model, (data.x_train, data.y_train), F.cross_entropy, steps=steps, optimizer=opt,
              lr=lr, optimizer_kwargs=kw, batch_size=config["batch_size"], grad_transform=gt,
              probe={"forward": False, "backward": False}, schedule=[0], device=dev, seed=seed)
    acc = math.nan if res.diverged else nets.accuracy(model, data.x_test.to(dev),
                                                      data.y_test.to(dev))
    return {"measure": measure, "seed": seed, "status": "diverged" if res.diverged else "done",
            "train_loss": res.final_loss, "test_accuracy": acc, "grad_ratio_init": res.grad_ratio,
            "steps": steps, "lr": lr}


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    key = {k: v for k, v in config.items() if k not in ("vanishing", "exploding", "seeds")}
    cells = {case: [B.Cell({**key, "case": config[case], "measure": m, "seed": s}, _one,
                           (config, case, m, s), tag=case)
                    for m in measures(config[case]) for s in range(int(config["seeds"]))]
             for case in ("vanishing", "exploding")}
    done = iter(B.cached_cells(workdir, [c for cs in cells.values() for c in cs],
                               workers=config.get("workers", 1)))
    for case, cs in cells.items():
        out[case] = [next(done) for _ in cs]
    out["chance_loss"] = math.log(10)
    return out


def score(row: dict[str, Any], chance: float) -> float:
    """Final training loss, with divergence (or a worse-than-chance loss) counted as chance."""
    return B.capped_loss(row.get("train_loss"), row.get("status") != "done", chance)


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


# --- measure / say ---------------------------------------------------------------------------
def measure(data: dict[str, Any]) -> dict[str, Any]:
    """Per case: the ranked table, the untreated entry, and per measure its effect, whether it
    helped and what the textbook expects."""
    chance = float(data["chance_loss"])
    out: dict[str, Any] = {}
    for case in ("vanishing", "exploding"):
        t = table(data[case], chance)
        base = next((e for e in t if e["measure"] == "untreated"), None)
        if base is None:
            continue
        ranked = [e for e in t if e["measure"] != "untreated"]
        out[case] = {"base": base, "ranked": ranked, "rows": [
            {"measure": e["measure"], "effect": effect(e, base), "helped": helped(e, base),
             "expected": TEXTBOOK[case].get(e["measure"])} for e in ranked]}
    return out


def _say_case(case: str, m: dict[str, Any], nums: dict[str, Any]) -> str:
    base, ranked = m["base"], m["ranked"]
    nums[f"{case}: untreated loss"] = base["score"]
    nums[f"{case}: ranking"] = ", ".join(f"{e['measure']} {B.fmt(e['score'])}" for e in ranked)
    for r in m["rows"]:
        nums[f"{case}: {r['measure']} - untreated"] = r["effect"].estimate
        nums[f"{case}: {r['measure']} - untreated 95% CI"] = [r["effect"].lo, r["effect"].hi]
    good = [r["measure"] for r in m["rows"] if r["helped"] is True]
    return (f"{case.capitalize()} network (untreated loss {B.fmt(base['score'])}, "
            f"{base['diverged']}/{base['n']} diverged): best "
            f"{', '.join(e['measure'] + ' ' + B.fmt(e['score']) for e in ranked[:3])}; helped "
            f"(95% interval of the loss change below -{B.pct(HELP_MARGIN)} of the untreated "
            f"loss): {', '.join(good) or 'nothing'}.")


def conclude(data: dict[str, Any]) -> B.Conclusion:
    m = measure(data)
    nums: dict[str, Any] = {}
    details = [_say_case(case, mc, nums) for case, mc in m.items()]
    rows = [(case, r) for case, mc in m.items() for r in mc["rows"] if r["expected"] is not None]
    undecided = [f"{r['measure']} ({case})" for case, r in rows if r["helped"] is None]
    decided = [(case, r) for case, r in rows if r["helped"] is not None]
    matched = sum(r["helped"] == r["expected"] for _, r in decided)
    mismatches = [
        f"{r['measure']} {'helped' if r['helped'] else 'did NOT help'} the {case} network "
        f"({E.describe(r['effect'], B.SUPPORTS if r['helped'] else B.CONTRADICTS)}), contrary "
        f"to the textbook ({SOURCES[case].get(r['measure'], 'textbook')})"
        for case, r in decided if r["helped"] != r["expected"]]
    agree = E.rate_effect(matched, len(decided), "agreement with the textbook", null=0.5)
    verdict = E.verdict(agree, +1) if decided else B.INCONCLUSIVE
    nums["textbook expectations matched (decided)"] = f"{matched}/{len(decided)}"
    nums.update(E.numbers(agree))
    nums["undecided measures"] = len(undecided)
    sentence = (
        f"{matched} of {len(decided)} decided textbook expectations hold "
        f"({E.describe(agree, verdict, B.pct)}); for {len(undecided)} measures the 95% interval "
        f"of the loss change straddles the {B.pct(HELP_MARGIN)} line (no decision). "
        + " ".join(details))
    if mismatches:
        sentence += " Against the textbook: " + "; ".join(mismatches) + "."
        details += mismatches
    if undecided:
        details.append("No decision (interval includes no effect): " + ", ".join(undecided) + ".")
    return B.conclusion(CLAIM, sentence, verdict, nums, details)


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
