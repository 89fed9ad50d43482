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

from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import grid as G
from signalprop.lab import plotting as P

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 2
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
    "(width 64) on scikit-learn digits with plain SGD; rate policy: each kind trains at every "
    "rate of a grid and is compared at its own best rate (fewest median steps to the target); "
    "metric: steps to reach the target training loss (3-point moving average of the recorded "
    "loss), a run that never reaches it counted at the budget (so its gap is a lower bound); "
    "3 seeds quick, 5 full, geometric-mean ratios with Welch 95% intervals on the logs. The "
    "measured Jacobian variance is held against the prediction with a 25% tolerance; finite "
    "width makes the ReLU/Gaussian spectra heavy-tailed, and a mismatch is flagged."
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
    "isometry_training": "Training loss vs step for deep critical networks, each at its best SGD "
    "rate (mean over seeds with the 95% interval); dotted line: the target loss.",
}

KINDS = [("tanh", True), ("tanh", False), ("relu", True), ("relu", False)]


def _kind_name(act: str, orth: bool) -> str:
    return f"{act}, {'orthogonal' if orth else 'Gaussian'}"


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {
    "spectrum_depth": 6, "spectrum_width": 32, "spectrum_seeds": [0, 1, 2],
    "train": {"data": "digits", "width": 32, "optimizer": "sgd", "lr": 0.01, "steps": 40,
              "batch_size": 64},
    "train_depth": 4, "train_seeds": 3, "record_every": 10, "lrs": [0.01],
}
#: Relative tolerance of measured vs predicted Jacobian moments.
THEORY_TOL = 0.25

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
        "lrs": [0.003, 0.01, 0.03],
        "train_depth": 32 if quick else 48,
        "train_seeds": 3 if quick else 5,
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
    spectra = B.cached_cells(workdir, [B.Cell({**skey, "act": a, "orth": o, "seed": s}, _spectrum,
                                              (config, a, o, s), tag="spectrum")
                                       for a, o in KINDS for s in config["spectrum_seeds"]],
                             workers=config.get("workers", 1))
    variants = {}
    for a, o in KINDS:
        sw, sb = _critical(a, config)
        variants[_kind_name(a, o)] = {"activation": a, "init": "orthogonal" if o else "lecun",
                                      "init_scale": sw, "bias_std": sb}
    grid = {
        "base": {**config["train"], "depth": config["train_depth"],
                 "record_every": config["record_every"], "device": config["device"]},
        "axes": {"kind": variants, "lr": list(config.get("lrs", [config["train"]["lr"]]))},
        "seeds": config["train_seeds"],
    }
    rows = G.run_grid(grid, workdir, "training", **G.grid_options(config),
                    curves=("loss",))
    train = [{"kind": r["kind"], "lr": r["lr"], "seed": r["seed"], "status": r["status"],
              "train_loss": r["train_loss"], "test_accuracy": r["test_accuracy"],
              "loss_steps": r["curves"]["loss"]["steps"],
              "losses": r["curves"]["loss"]["values"]} for r in rows]
    return {"spectra": spectra, "train": train, "target_loss": config["target_loss"],
            "steps": config["train"]["steps"],
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


def _steps(train: list[dict[str, Any]], kind: str, target: float, budget: float,
           lr: float | None = None) -> list[float]:
    """Per-seed steps to the target (never reached: the budget, a lower bound)."""
    return [min(steps_to_target(r["loss_steps"], r["losses"], target), budget) for r in train
            if r["kind"] == kind and (lr is None or r.get("lr") == lr)]


def best_rate(train: list[dict[str, Any]], kind: str, target: float, budget: float) -> float:
    """The rate of the grid at which ``kind`` reaches the target in the fewest median steps
    (ties: the lower median final training loss)."""
    lrs = sorted({r.get("lr") for r in train if r["kind"] == kind}, key=lambda v: (v is None, v))

    def score(lr: Any) -> tuple[float, float]:
        st = _steps(train, kind, target, budget, lr)
        fl = [r["train_loss"] if r["status"] == "done" else math.inf for r in train
              if r["kind"] == kind and r.get("lr") == lr]
        return (float(np.median(st)) if st else math.inf,
                float(np.median(fl)) if fl else math.inf)

    return min(lrs, key=score) if lrs else math.nan


def _spectra_of(data: dict[str, Any], a: str, o: bool) -> list[dict[str, Any]]:
    return [s for s in data["spectra"] if s["activation"] == a and s["orthogonal"] == o]


def measure(data: dict[str, Any]) -> dict[str, Any]:
    """The numbers: per kind the Jacobian variance per seed and its theory check; orthogonal
    tanh's variance over the nearest other kind's; per kind the best rate of the grid and the
    steps to the target at it; orthogonal tanh's steps over the fastest other kind's."""
    per_seed: dict[str, list[float]] = {}
    checks, means = [], {}
    for a, o in KINDS:
        k, sp = _kind_name(a, o), _spectra_of(data, a, o)
        if not sp:
            continue
        per_seed[k] = [float(s["measured"]["variance"]) for s in sp]
        means[k] = float(np.mean([s["measured"]["mean"] for s in sp]))
        checks.append(E.theory_check(
            f"{k}: Jacobian s^2 variance", float(sp[0]["predicted"]["variance"]),
            float(np.mean(per_seed[k])), THEORY_TOL,
            note="finite width: the theory is the infinite-width limit; the heavy tail is "
            "both under-sampled and corrected by terms growing with depth / width"
            if a == "relu" or not o else ""))
    m: dict[str, Any] = {"per_seed": per_seed, "means": means, "checks": checks}
    ot = "tanh, orthogonal"
    if ot in per_seed and len(per_seed) > 1:
        others = {k: v for k, v in per_seed.items() if k != ot}
        nearest = min(others, key=lambda k: float(np.mean(others[k])))
        m["conditioning"] = E.log_ratio_effect(per_seed[ot], others[nearest],
                                               f"Jacobian variance orthogonal tanh / {nearest}")
    target = float(data["target_loss"])
    budget = float(data.get("steps") or max((max(r["loss_steps"] or [0]) for r in data["train"]),
                                            default=0))
    kinds = [_kind_name(a, o) for a, o in KINDS]
    best = {k: best_rate(data["train"], k, target, budget) for k in kinds}
    st = {k: _steps(data["train"], k, target, budget, best[k]) for k in kinds}
    m.update(target=target, budget=budget, best=best, steps=st)
    rivals = [k for k in kinds if k != ot and st[k]]
    if st.get(ot) and rivals:
        rival = min(rivals, key=lambda k: float(np.median(st[k])))
        m["rival"] = rival
        m["speed"] = E.log_ratio_effect(st[ot], st[rival],
                                        f"steps to loss {B.fmt(target)} orthogonal tanh / {rival}")
        m["unreached"] = all(x >= budget for x in st[ot] + st[rival])
    return m


def _say_spectra(m: dict[str, Any], depth: int, nums: dict[str, Any]) -> tuple[list[str], list[str]]:
    for c in m["checks"]:
        k = c.name.split(":")[0]
        nums[f"{k}: Jacobian s^2 variance measured / predicted"] = \
            f"{B.fmt(c.measured)} / {B.fmt(c.predicted)}"
        nums[f"{k}: Jacobian s^2 mean (theory 1)"] = m["means"][k]
        nums[f"{k}: theory check"] = c.to_dict()
    details, verdicts = [], []
    if "conditioning" in m:
        eff = m["conditioning"]
        v1 = E.verdict(eff, -1)
        nums.update(E.numbers(eff))
        details.append(
            f"Jacobian spectrum at depth {depth}: variance of the squared singular values "
            + ", ".join(f"{B.fmt(float(np.mean(v)))} ({k})" for k, v in m["per_seed"].items())
            + f"; {E.describe(eff, v1)}"
            + ("." if v1 != B.CONTRADICTS else "; orthogonal tanh is NOT the best conditioned."))
        verdicts.append(v1)
    details.append("Theory vs measurement: " + "; ".join(c.text() for c in m["checks"]) + ".")
    return details, verdicts


def _say_training(m: dict[str, Any], depth: int, nums: dict[str, Any]) -> tuple[str, str]:
    best, st, target = m["best"], m["steps"], m["target"]
    for k in best:
        nums[f"{k}: best lr"] = best[k]
        nums[f"{k}: median steps to loss {B.fmt(target)}"] = float(np.median(st[k])) \
            if st[k] else math.nan
    if "speed" not in m:
        return f"Training at depth {depth}: no runs to compare.", B.INCONCLUSIVE
    eff = m["speed"]
    v2 = B.INCONCLUSIVE if m["unreached"] else E.verdict(eff, -1)  # budget too small
    nums.update(E.numbers(eff))
    return (f"Training at depth {depth}, each kind at its best SGD rate "
            + ", ".join(f"{k} lr {B.fmt(best[k])}: {B.fmt(float(np.median(st[k])))} steps"
                        for k in best if st[k])
            + f" (median; budget {B.fmt(m['budget'])}); {E.describe(eff, v2)}"
            + ("." if v2 != B.CONTRADICTS
               else f"; the fastest is NOT orthogonal tanh but {m['rival']}."), v2)


def conclude(data: dict[str, Any]) -> B.Conclusion:
    m = measure(data)
    nums: dict[str, Any] = {}
    details, verdicts = _say_spectra(m, data["depth"], nums)
    d2, v2 = _say_training(m, data["train_depth"], nums)
    details.append(d2)
    verdict = B.combine_verdicts(verdicts + [v2])
    sentence = " ".join(d for d in details if not d.startswith("Theory"))
    if verdict == B.CONTRADICTS:
        sentence = "The measurements contradict part of the claim. " + sentence
    return B.conclusion(CLAIM, sentence, verdict, nums, details)


_COLORS = {"tanh, orthogonal": P.NORMED, "tanh, Gaussian": P.THIRD,
           "relu, orthogonal": P.PLAIN, "relu, Gaussian": P.FOURTH}


def _fig_spectra(data: dict[str, Any], path: Path) -> Path:
    fig, ax = P.panel((5.6, 3.6))
    # rank-deficient ReLU Jacobians have singular values down to rounding level: gather every
    # value below 1e-6 into the first bin so the interesting range stays visible
    floor = -6.0
    allv = np.concatenate([np.asarray(s["s2"], dtype=float) for s in data["spectra"]])
    allv = allv[allv > 0]
    hi = float(np.log10(allv.max())) if allv.size else 3.0
    ax.set_xlim(floor - 0.2, max(hi, 1.0) + 0.2)
    for a, o in KINDS:
        k = _kind_name(a, o)
        v = np.concatenate([np.asarray(s["s2"], dtype=float) for s in _spectra_of(data, a, o)]
                           or [np.zeros(0)])
        if v.size:
            # empirical CDF: a spectrum concentrated at 1 is a near-vertical step at 0
            lv = np.sort(np.clip(np.log10(np.maximum(v, 1e-300)), floor, None))
            ax.plot(lv, np.arange(1, lv.size + 1) / lv.size, color=_COLORS[k], lw=1.5, label=k)
    ax.axvline(0.0, color="k", lw=0.6)
    P.finish(ax, "log10 of squared singular value of the Jacobian (values < 1e-6 at -6)",
             "fraction of singular values <= x",
             f"Jacobian spectra at criticality, depth {data['depth']}", legend="center left")
    return P.save(fig, path)


def _fig_moments(data: dict[str, Any], path: Path) -> Path:
    fig, ax = P.panel((5.2, 3.4))
    names, meas, pred, effs = [], [], [], []
    for a, o in KINDS:
        sp = _spectra_of(data, a, o)
        if sp:
            names.append(_kind_name(a, o))
            meas.append(float(np.mean([s["measured"]["variance"] for s in sp])))
            pred.append(float(sp[0]["predicted"]["variance"]))
            effs.append(E.mean_effect([s["measured"]["variance"] for s in sp]))
    x = np.arange(len(names))
    ax.bar(x, np.maximum(meas, 1e-6), color=[_COLORS[n] for n in names], alpha=0.7,
           label="measured (mean, 95% CI)")
    P.errorbars(ax, x, effs, color="#333333", ls="none")
    ax.plot(x, np.maximum(pred, 1e-6), "k_", ms=25, mew=2, label="theory")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=15)
    P.finish(ax, "", "variance of squared singular values",
             "Measured vs predicted spectrum variance", yscale="log")
    P.nice_log_ticks(ax, "y")
    return P.save(fig, path)


def _fig_training(data: dict[str, Any], path: Path) -> Path:
    fig, ax = P.panel((5.4, 3.6))
    budget = float(data.get("steps") or 0)
    for a, o in KINDS:
        k = _kind_name(a, o)
        lr = best_rate(data["train"], k, float(data["target_loss"]), budget)
        rs = [r for r in data["train"] if r["kind"] == k and r["losses"] and r.get("lr") == lr]
        if rs:
            n = min(len(r["losses"]) for r in rs)
            P.mean_band(ax, rs[0]["loss_steps"][:n], [r["losses"][:n] for r in rs],
                        color=_COLORS[k], label=f"{k} (lr {B.fmt(lr)})")
    ax.axhline(data["target_loss"], color="#555", ls=":", lw=1, label="target")
    P.finish(ax, "training step (SGD)", "training loss (mini-batch)",
             f"Training deep critical networks (depth {data['train_depth']})", yscale="log")
    return P.save(fig, path)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    return [_fig_spectra(data, d / "isometry_spectra.png"),
            _fig_moments(data, d / "isometry_moments.png"),
            _fig_training(data, d / "isometry_training.png")]
