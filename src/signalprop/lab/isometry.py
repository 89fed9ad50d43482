"""Dynamical isometry: orthogonal vs Gaussian weights at criticality, tanh vs ReLU.

Pennington, Schoenholz & Ganguli (2017) showed that at the edge of chaos the squared singular
values of the input-output Jacobian have mean 1 but a variance that grows with depth as
L (mu_2/mu_1^2 - 1 - s_1) (s_1 = 0 orthogonal, -1 Gaussian weights; mu_k = E[phi'(h)^(2k)]):
orthogonal tanh networks with small q* are nearly isometric (variance ~0), Gaussian ones are not,
and ReLU networks cannot be (mu_2/mu_1^2 = 2); isometric networks train much faster. This study
measures the Jacobian spectra of wide random networks (signalprop.theory) beside the theory, and
the number of SGD steps deep networks of each kind need to reach a target training loss (sweep
runner).
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
    cached,
    combine_verdicts,
    conclusion,
    fmt,
)
from signalprop.lab.grid import grid_options, run_grid

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 1
NAME = "isometry"
TITLE = "Dynamical isometry: orthogonal vs Gaussian, tanh vs ReLU"
QUESTION = (
    "Do orthogonal weights at the edge of chaos make a deep tanh network's Jacobian "
    "well-conditioned (dynamical isometry), and does that make it train faster than Gaussian "
    "or ReLU networks?"
)
CLAIM = (
    "At criticality, orthogonal tanh networks have a Jacobian spectrum concentrated near 1, "
    "while Gaussian tanh and all ReLU networks have spectra whose variance grows with depth "
    "(Pennington et al. 2017); the isometric networks reach a target loss in fewer steps."
)
SETUP = (
    "Spectra: wide random MLPs at the critical point (tanh: sigma_b^2 = 1e-3 and the critical "
    "sigma_w from signalprop.theory.critical_point; ReLU: sigma_w = sqrt(2), sigma_b = 0), "
    "orthogonal or Gaussian weights; squared singular values of the input-output Jacobian in "
    "float64 at one input (signalprop.theory.measure_gradient_profile), beside the predicted "
    "mean and variance (signalprop.theory.jacobian_moments). Training: MLPs of the same kinds "
    "(width 64) on scikit-learn digits with plain SGD, several seeds; steps to reach the target "
    "training loss are read from the loss recorded along the way (sweep runner)."
)
REFERENCES = [
    "Pennington, Schoenholz & Ganguli 2017, Resurrecting the sigmoid in deep learning through "
    "dynamical isometry",
    "Saxe, McClelland & Ganguli 2013 (orthogonal initialisation)",
]
CAPTIONS = {
    "isometry_spectra": "Cumulative distribution of the squared singular values of the "
    "input-output Jacobian (log10) at criticality, for tanh and ReLU with orthogonal and Gaussian "
    "weights (all seeds pooled); dynamical isometry is a steep step at 0.",
    "isometry_moments": "Variance of the squared singular values: measured (bars) vs the "
    "Pennington et al. (2017) prediction (markers).",
    "isometry_training": "Training loss vs step for deep critical networks (mean over seeds); "
    "dotted line: the target loss.",
}

KINDS = [("tanh", True), ("tanh", False), ("relu", True), ("relu", False)]


def _kind_name(act: str, orth: bool) -> str:
    return f"{act}, {'orthogonal' if orth else 'Gaussian'}"


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {
    "spectrum_depth": 6, "spectrum_width": 32, "spectrum_seeds": [0],
    "train": {"data": "digits", "width": 32, "optimizer": "sgd", "lr": 0.01, "steps": 40,
              "batch_size": 64},
    "train_depth": 4, "train_seeds": 1, "record_every": 10,
}

def get_config(quick: bool) -> dict[str, Any]:
    return {
        "tanh_sigma_b2": 1e-3,
        "spectrum_depth": 32 if quick else 64,
        "spectrum_width": 200 if quick else 400,
        "spectrum_seeds": [0, 1, 2, 3] if quick else list(range(8)),
        "train": {
            "data": "digits", "width": 64, "optimizer": "sgd", "lr": 0.01,
            "steps": 400 if quick else 1500, "batch_size": 64,
        },
        "train_depth": 32 if quick else 64,
        "train_seeds": 2 if quick else 3,
        "record_every": 10,
        "target_loss": 0.5,
        "device": "cpu",
    }


def _critical(act: str, config: dict[str, Any]) -> tuple[float, float]:
    """(sigma_w, sigma_b) of the critical point used for ``act``."""
    if act == "relu":
        return math.sqrt(2.0), 0.0
    from signalprop.theory import critical_point

    sb2 = float(config["tanh_sigma_b2"])
    return float(critical_point(act, sb2).sigma_w), math.sqrt(sb2)


def _spectrum(config: dict[str, Any], act: str, orth: bool, seed: int) -> dict[str, Any]:
    from signalprop.theory.torch_adapter import measure_gradient_profile

    sw, sb = _critical(act, config)
    q_in = 1.0  # ReLU at sigma_b = 0: every q is a fixed point
    if act != "relu":
        from signalprop.theory import critical_point

        # start on the fixed point q*, so that every layer sits at criticality
        q_in = float(critical_point(act, sb * sb).q_star)
    p = measure_gradient_profile(
        act, sw * sw, sb * sb, depth=config["spectrum_depth"], width=config["spectrum_width"],
        batch_size=4, q_in=q_in, orthogonal=orth, jacobian=True, seed=seed,
        device=config["device"],
    )
    return {"activation": act, "orthogonal": orth, "seed": seed, "sigma_w": sw, "sigma_b": sb,
            "s2": p.jacobian_sq_singular_values.tolist(),
            "measured": p.jacobian_measured, "predicted": p.jacobian_predicted}


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    skey = {k: config[k] for k in ("tanh_sigma_b2", "spectrum_depth", "spectrum_width", "device")}
    spectra = [cached(workdir, {**skey, "act": a, "orth": o, "seed": s},
                      lambda a=a, o=o, s=s: _spectrum(config, a, o, s), tag="spectrum")
               for a, o in KINDS for s in config["spectrum_seeds"]]
    variants = {}
    for a, o in KINDS:
        sw, sb = _critical(a, config)
        variants[_kind_name(a, o)] = {"activation": a, "init": "orthogonal" if o else "lecun",
                                      "init_scale": sw, "bias_std": sb}
    grid = {
        "base": {**config["train"], "depth": config["train_depth"],
                 "record_every": config["record_every"], "device": config["device"]},
        "axes": {"kind": variants},
        "seeds": config["train_seeds"],
    }
    rows = run_grid(grid, workdir, "training", **grid_options(config),
                    curves=("loss",))
    train = [{"kind": r["kind"], "seed": r["seed"], "status": r["status"],
              "train_loss": r["train_loss"], "test_accuracy": r["test_accuracy"],
              "loss_steps": r["curves"]["loss"]["steps"],
              "losses": r["curves"]["loss"]["values"]} for r in rows]
    return {"spectra": spectra, "train": train, "target_loss": config["target_loss"],
            "depth": config["spectrum_depth"], "train_depth": config["train_depth"]}


def steps_to_target(steps: list[int], losses: list[float], target: float) -> float:
    """First recorded step whose loss (moving average of 3 recordings, to damp mini-batch
    noise) is at or below ``target``; ``inf`` if never."""
    x = np.asarray(losses, dtype=float)
    if x.size == 0:
        return math.inf
    k = min(3, x.size)
    sm = np.convolve(x, np.ones(k) / k, mode="valid")
    hit = np.nonzero(np.isfinite(sm) & (sm <= target))[0]
    return float(steps[hit[0] + k - 1]) if hit.size else math.inf


def _median_steps(train: list[dict[str, Any]], kind: str, target: float) -> float:
    vals = [steps_to_target(r["loss_steps"], r["losses"], target) for r in train
            if r["kind"] == kind]
    return float(np.median(vals)) if vals else math.nan


def conclude(data: dict[str, Any]) -> Conclusion:
    nums: dict[str, Any] = {}
    details: list[str] = []
    verdicts: list[str] = []
    var: dict[str, float] = {}
    for a, o in KINDS:
        k = _kind_name(a, o)
        sp = [s for s in data["spectra"] if s["activation"] == a and s["orthogonal"] == o]
        if not sp:
            continue
        mv = float(np.mean([s["measured"]["variance"] for s in sp]))
        pv = float(sp[0]["predicted"]["variance"])
        mm = float(np.mean([s["measured"]["mean"] for s in sp]))
        var[k] = mv
        nums[f"{k}: Jacobian s^2 variance measured / predicted"] = f"{fmt(mv)} / {fmt(pv)}"
        nums[f"{k}: Jacobian s^2 mean (theory 1)"] = mm
    L = data["depth"]
    to, tg = var.get("tanh, orthogonal"), var.get("tanh, Gaussian")
    ro, rg = var.get("relu, orthogonal"), var.get("relu, Gaussian")
    if None not in (to, tg, ro, rg):
        best = min(var, key=var.get)
        v1 = SUPPORTS if best == "tanh, orthogonal" and to < 0.25 * min(tg, ro, rg) else (
            CONTRADICTS if best != "tanh, orthogonal" else INCONCLUSIVE)
        details.append(
            f"Jacobian spectrum at depth {L}: variance of the squared singular values "
            f"{fmt(to)} (tanh, orthogonal) vs {fmt(tg)} (tanh, Gaussian), {fmt(ro)} (ReLU, "
            f"orthogonal), {fmt(rg)} (ReLU, Gaussian)"
            + ("." if best == "tanh, orthogonal" else
               f"; the best-conditioned is NOT orthogonal tanh but {best}.")
        )
        verdicts.append(v1)
    target = float(data["target_loss"])
    st = {_kind_name(a, o): _median_steps(data["train"], _kind_name(a, o), target)
          for a, o in KINDS}
    for k, v in st.items():
        nums[f"{k}: median steps to loss {fmt(target)}"] = v
    fin = {k: v for k, v in st.items() if math.isfinite(v)}
    if fin:
        fastest = min(fin, key=fin.get)
        others = [v for k, v in st.items() if k != "tanh, orthogonal"]
        t_orth = st.get("tanh, orthogonal", math.inf)
        if fastest == "tanh, orthogonal" and all(t_orth < o for o in others):
            v2 = SUPPORTS
        elif math.isfinite(t_orth) and t_orth <= min(others):
            v2 = INCONCLUSIVE  # tied with another kind
        else:
            v2 = CONTRADICTS
        details.append(
            f"Training at depth {data['train_depth']}: median steps to reach training loss "
            f"{fmt(target)}: " + ", ".join(f"{k} {fmt(v)}" for k, v in st.items())
            + ("." if v2 != CONTRADICTS else f"; the fastest is NOT orthogonal tanh but "
               f"{fastest}.")
        )
    else:
        v2 = INCONCLUSIVE
        details.append(f"Training at depth {data['train_depth']}: no network reached training "
                       f"loss {fmt(target)} within the step budget.")
    verdicts.append(v2)
    verdict = combine_verdicts(verdicts)
    sentence = " ".join(details)
    if verdict == CONTRADICTS:
        sentence = "The measurements contradict part of the claim. " + sentence
    return conclusion(CLAIM, sentence, verdict, nums, details)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    out = []
    colors = {"tanh, orthogonal": P.NORMED, "tanh, Gaussian": P.THIRD,
              "relu, orthogonal": P.PLAIN, "relu, Gaussian": P.FOURTH}
    fig, axes = P.subplots(1, 1, size=(5.6, 3.6))
    ax = axes[0, 0]
    # rank-deficient ReLU Jacobians have singular values down to rounding level: gather every
    # value below 1e-6 into the first bin so the interesting range stays visible
    floor = -6.0
    allv = np.concatenate([np.asarray(s["s2"], dtype=float) for s in data["spectra"]])
    allv = allv[allv > 0]
    hi = float(np.log10(allv.max())) if allv.size else 3.0
    ax.set_xlim(floor - 0.2, max(hi, 1.0) + 0.2)
    for a, o in KINDS:
        k = _kind_name(a, o)
        v = np.concatenate([np.asarray(s["s2"], dtype=float) for s in data["spectra"]
                            if s["activation"] == a and s["orthogonal"] == o] or [np.zeros(0)])
        if v.size:
            # empirical CDF: a spectrum concentrated at 1 is a near-vertical step at 0
            lv = np.sort(np.clip(np.log10(np.maximum(v, 1e-300)), floor, None))
            ax.plot(lv, np.arange(1, lv.size + 1) / lv.size, color=colors[k], lw=1.5, label=k)
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set_xlabel("log10 of squared singular value of the Jacobian (values < 1e-6 at -6)")
    ax.set_ylabel("fraction of singular values <= x")
    ax.set_title(f"Jacobian spectra at criticality, depth {data['depth']}")
    ax.legend(loc="center left")
    out.append(P.save(fig, d / "isometry_spectra.png"))
    fig, axes = P.subplots(1, 1, size=(5.2, 3.4))
    ax = axes[0, 0]
    names, meas, pred = [], [], []
    for a, o in KINDS:
        sp = [s for s in data["spectra"] if s["activation"] == a and s["orthogonal"] == o]
        if sp:
            names.append(_kind_name(a, o))
            meas.append(float(np.mean([s["measured"]["variance"] for s in sp])))
            pred.append(float(sp[0]["predicted"]["variance"]))
    x = np.arange(len(names))
    ax.bar(x, np.maximum(meas, 1e-6), color=[colors[n] for n in names], alpha=0.7,
           label="measured")
    ax.plot(x, np.maximum(pred, 1e-6), "k_", ms=25, mew=2, label="theory")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("variance of squared singular values")
    P.nice_log_ticks(ax, "y")
    ax.set_title("Measured vs predicted spectrum variance")
    ax.legend(loc="best")
    out.append(P.save(fig, d / "isometry_moments.png"))
    fig, axes = P.subplots(1, 1, size=(5.4, 3.6))
    ax = axes[0, 0]
    for a, o in KINDS:
        k = _kind_name(a, o)
        rs = [r for r in data["train"] if r["kind"] == k and r["losses"]]
        if not rs:
            continue
        n = min(len(r["losses"]) for r in rs)
        y = np.nanmean(np.stack([np.asarray(r["losses"][:n], dtype=float) for r in rs]), axis=0)
        ax.plot(rs[0]["loss_steps"][:n], y, color=colors[k], label=k)
    ax.axhline(data["target_loss"], color="#555", ls=":", lw=1, label="target")
    ax.set_yscale("log")
    ax.set_xlabel("training step (SGD)")
    ax.set_ylabel("training loss (mini-batch)")
    ax.set_title(f"Training deep critical networks (depth {data['train_depth']})")
    ax.legend(loc="best")
    out.append(P.save(fig, d / "isometry_training.png"))
    return out
