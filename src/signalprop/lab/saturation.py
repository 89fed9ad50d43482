"""Does batch norm stop sigmoid saturation? (the analogue of Ioffe & Szegedy 2015, Figure 1)

Three hidden layers of 100 sigmoid units, Gaussian initialisation scaled so that the plain network
does saturate, mini-batches of 60, trained with and without batch norm before each sigmoid on real
data (scikit-learn digits; MNIST-1D as well in the full configuration), by the package's loop
(:func:`signalprop.train.fit`). Every few steps a :class:`signalprop.probe.Probe` records a fixed
probe batch: the saturated fraction of every sigmoid layer (``saturated_frac``: |sigmoid'(z)| below
10% of its maximum) and, for the ReLU part, the units off per example (``off_frac``) and dead over
the batch (``dead_frac``); the 15th/50th/85th percentiles of one last-layer sigmoid's input (the
Figure 1 analogue: the record keeps layer-level percentiles only) are read by a hook on that unit.
A ReLU + BN network is trained as well, with BN's shift beta learnable vs frozen at 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from signalprop import stats
from signalprop.lab import base as B
from signalprop.lab import evidence as E
from signalprop.lab import nets
from signalprop.lab import plotting as P
from signalprop.probe import Probe

#: Bumped when the measurements change meaning (stored results then go stale).
VERSION = 3
NAME = "saturation"
TITLE = "Batch norm and sigmoid saturation"
QUESTION = (
    "Does batch norm stop sigmoid saturation, keep the input distribution of each layer stable, "
    "and so make a sigmoid network train faster?"
)
CLAIM = (
    "With batch norm before each sigmoid, fewer units saturate, the distribution of a sigmoid's "
    "input stays stable during training instead of drifting, and the network reaches a given "
    "test accuracy sooner (Ioffe & Szegedy 2015, Figure 1); in a BN-ReLU network a learnable "
    "shift (beta) lets the network keep fewer than the half of its units off per example that "
    "beta = 0 forces."
)
SETUP = (
    "signalprop.engine.MLP with 3 hidden layers of 100 sigmoid units (init 'kaiming' with a "
    "linear gain, i.e. N(0, 1/fan_in), then 'scale' s = 3 so that the plain network does "
    "saturate; zero biases), softmax + cross-entropy, plain SGD on mini-batches of 60 "
    "(signalprop.train.fit); the same network with norm 'batch' before every sigmoid. Data: "
    "scikit-learn digits (and MNIST-1D in the full run). Every few steps a Probe records a fixed "
    "probe batch of training examples (BN statistics of the batch, running statistics "
    "untouched): saturated_frac per layer from the record; the 15/50/85th percentiles of one "
    "last-layer sigmoid's input from a hook on that layer. Metrics and intervals (Welch, over 3 "
    "seeds quick / 5 full): saturated fraction in the second half of training (tested only "
    "where the plain network saturates at least 5%: otherwise BN has nothing to cure), drift "
    "of a last-layer sigmoid's median input in units of its 15-85 spread (ratio, on the logs), "
    "mean test accuracy over training (a speed measure: budget fixed, both at the same SGD rate "
    "0.5, the rate of the Ioffe & Szegedy analogue). ReLU part: the same shape with ReLU units "
    "and BN (N(0, 1/fan_in) init), beta learnable vs frozen at 0, at a large rate (3.0; in the "
    "full run also at 0.5): the probe's off_frac (units with output 0 per example, averaged "
    "over examples and units; not dead_frac, units off for the whole batch, which beta = 0 "
    "rules out by construction) at the end of training, and the final test accuracy."
)
REFERENCES = [
    "Ioffe & Szegedy 2015, Batch Normalization (Figure 1)",
    "Glorot & Bengio 2010 (saturation of sigmoid units)",
]
CAPTIONS = {
    "saturation_accuracy": "Test accuracy vs training step, with and without batch norm "
    "(mean over seeds; shaded: 95% t interval).",
    "saturation_percentiles": "15th, 50th and 85th percentiles of the input of one sigmoid in the "
    "last hidden layer over training, on a fixed probe batch (cf. Ioffe & Szegedy 2015, Fig. 1b/c).",
    "saturation_fraction": "Saturated fraction (|sigmoid'(z)| < 0.1 x max) per hidden layer over "
    "training, with and without batch norm.",
    "saturation_dead_relu": "Fraction of ReLU units off per example (mean over the probe batch "
    "and the hidden layers) in a BN-ReLU network, BN's beta learnable vs frozen at 0 (mean over "
    "seeds, 95% interval).",
}

#: The plain network must saturate at least this much (mean saturated fraction over the second
#: half of training) for "BN lowers saturation" to be tested: otherwise there is nothing to cure.
MIN_SATURATION = 0.05


#: Overrides that shrink the study to a few seconds (used by the test suite).
SMOKE: dict[str, Any] = {"steps": 120, "relu_steps": 60, "record_every": 20, "seeds": [0, 1, 2],
                         "width": 32, "probe_batch": 128, "init_scales": [3.0]}


def get_config(quick: bool) -> dict[str, Any]:
    return {
        "datasets": ["digits"] if quick else ["digits", "mnist1d"],
        "width": 100,
        "depth": 3,
        "steps": 1000 if quick else 6000,
        "batch_size": 60,
        "lr": 0.5,
        "init_scale": 1.0,
        "init_scales": [3.0],
        "seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
        "record_every": 50 if quick else 200,
        "probe_batch": 512,
        "unit": 0,
        # a large rate (where dying units show up) and, in the full run, the sigmoid's rate
        "relu_lrs": [3.0] if quick else [0.5, 3.0],
        "relu_steps": 600 if quick else 4000,
        "device": "cpu",
    }


class _UnitInput:
    """Keeps the input of the last hidden layer's activation during a probe pass (per-unit
    percentiles: the probe's record holds the layer's pooled percentiles only)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.z: torch.Tensor | None = None
        self.on = False
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        if self.on:
            self.z = args[0].detach()

    def percentiles(self) -> list:
        assert self.z is not None
        q = stats.percentiles(self.z.T.contiguous(), (15.0, 50.0, 85.0), max_samples=None)
        return q.tolist()  # [units, 3]


def _train_one(
    config: dict[str, Any], dataset: str, variant: str, seed: int, relu: bool,
    scale: float | None = None, lr: float | None = None,
) -> dict[str, Any]:
    data = nets.dataset(dataset, config["device"])
    scale = float(config["init_scale"] if scale is None else scale)
    model = nets.mlp(data, config["width"], config["depth"], "relu" if relu else "sigmoid",
                     "none" if variant == "plain" else "batch", nonlinearity="linear",
                     scale=1.0 if relu else scale, seed=seed)
    if variant == "bn-frozen-beta":
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.bias.requires_grad_(False)
                m.bias.zero_()
    pg = torch.Generator().manual_seed(10_000 + seed)
    xp = data.x_train[torch.randperm(data.x_train.shape[0], generator=pg)[: config["probe_batch"]]
                      .to(data.x_train.device)]
    probe = Probe(model, backward=False, weights=False, max_forward_samples=None)
    unit = _UnitInput(model.layers[-1].act)
    pcts: list = []

    def on_record(step: int) -> None:
        unit.on = True
        nets.probe_pass(probe, model, xp)
        unit.on = False
        pcts.append(unit.percentiles())

    lr = float(lr if lr is not None else config["lr"])
    r, steps, accs = nets.train(model, data, steps=config["relu_steps" if relu else "steps"],
                                lr=lr, batch_size=config["batch_size"], seed=seed,
                                every=config["record_every"], on_record=on_record)
    names = [f"layers.{i}.act" for i in range(config["depth"])]
    out = {"dataset": dataset, "variant": variant, "seed": seed, "relu": relu, "scale": scale,
           "lr": lr, "eval_steps": steps, "test_acc": accs, "final_test_acc": accs[-1],
           "diverged": r.diverged, "probe_steps": steps, "wall_s": r.wall_time}
    for key, metric in ((("dead", "dead_frac"), ("off", "off_frac")) if relu else
                        (("saturated", "saturated_frac"),)):
        out[key] = probe.record.matrix(metric, names)[2].tolist()  # [T][L]
    if not relu:
        out["last_pcts"] = pcts  # [T][units][3]
    return out


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    base = {k: v for k, v in config.items()
            if k not in ("datasets", "seeds", "executor", "init_scales", "relu_lrs")}
    runs = [B.Cell({**base, "dataset": ds, "variant": v, "seed": s, "relu": False, "scale": sc},
                   _train_one, (config, ds, v, s, False, sc), tag="sig")
            for ds in config["datasets"] for sc in config["init_scales"]
            for v in ("plain", "bn") for s in config["seeds"]]
    ds0 = config["datasets"][0]
    relu_runs = [B.Cell({**base, "dataset": ds0, "variant": v, "seed": s, "relu": True,
                         "relu_lr": lr}, _train_one, (config, ds0, v, s, True, None, lr),
                        tag="relu")
                 for lr in config["relu_lrs"] for v in ("bn", "bn-frozen-beta")
                 for s in config["seeds"]]
    done = B.cached_cells(workdir, runs + relu_runs, workers=config.get("workers", 1))
    runs, relu_runs = done[: len(runs)], done[len(runs):]
    return {"runs": runs, "relu_runs": relu_runs, "unit": config["unit"],
            "datasets": config["datasets"], "init_scales": config["init_scales"]}


# --- summaries --------------------------------------------------------------------------------
def drift(last_pcts: list) -> float:
    """How far the input distribution of last-layer sigmoids wanders during training, in units of
    its own width: path length of the median over training divided by the mean 15-85 spread,
    averaged over the units of the layer.

    Args:
        last_pcts: [T][units][3] percentiles (15, 50, 85) at T recording steps.
    """
    a = np.asarray(last_pcts, dtype=float)  # [T, U, 3]
    if a.ndim != 3 or a.shape[0] < 2:
        return float("nan")
    path = np.abs(np.diff(a[:, :, 1], axis=0)).sum(axis=0)  # [U]
    width = (a[:, :, 2] - a[:, :, 0]).mean(axis=0)  # [U]
    return float(np.nanmean(path / np.maximum(width, 1e-12)))


def _sel(runs: list[dict[str, Any]], variant: str, dataset: str,
         scale: float | None) -> list[dict[str, Any]]:
    return [r for r in runs if r["variant"] == variant and r["dataset"] == dataset
            and (scale is None or r.get("scale", scale) == scale)]


def per_seed(runs: list[dict[str, Any]], variant: str, dataset: str,
             scale: float | None = None) -> dict[str, list[float]]:
    """Per-seed summaries: saturated fraction (second half of training), drift, mean and final
    test accuracy."""
    out: dict[str, list[float]] = {"saturated": [], "drift": [], "mean_acc": [], "final_acc": []}
    for r in _sel(runs, variant, dataset, scale):
        a = np.asarray(r["saturated"], dtype=float)  # [T, L]
        out["saturated"].append(float(np.nanmean(a[a.shape[0] // 2:])))
        out["drift"].append(drift(r["last_pcts"]))
        # area under the accuracy curve = mean accuracy over the recordings: "trains faster"
        out["mean_acc"].append(float(np.nanmean(np.asarray(r["test_acc"], dtype=float))))
        out["final_acc"].append(float(r["final_test_acc"]))
    return out


def measure(data: dict[str, Any]) -> dict[str, Any]:
    """The numbers behind the conclusion: per (data set, init scale) the per-seed summaries and
    the effects BN - plain (saturation, drift, speed); per ReLU rate the off fraction and
    accuracy, beta learnable - frozen."""
    arms = []
    for ds in data["datasets"]:
        for sc in data.get("init_scales") or [None]:
            p, b = per_seed(data["runs"], "plain", ds, sc), per_seed(data["runs"], "bn", ds, sc)
            if not p["saturated"] or not b["saturated"]:
                continue
            tag = f"{ds}" + (f", init x{B.fmt(sc)}" if sc is not None else "")
            arms.append({
                "tag": tag, "plain": p, "bn": b,
                "saturates": float(np.mean(p["saturated"])) >= MIN_SATURATION,
                "sat": E.diff_effect(b["saturated"], p["saturated"],
                                     f"{tag}: saturated BN - plain"),
                "drift": E.log_ratio_effect(b["drift"], p["drift"], f"{tag}: drift BN / plain"),
                "speed": E.diff_effect(b["mean_acc"], p["mean_acc"],
                                       f"{tag}: mean test accuracy over training BN - plain"),
            })
    rr = [r for r in data.get("relu_runs", []) if "off" in r]
    relu = []
    for lr in sorted({r.get("lr") for r in rr}, key=lambda v: (v is None, v)):
        def of(variant: str, key: str, lr: Any = lr) -> list[float]:
            return [float(np.nanmean(np.asarray(r["off"], dtype=float)[-1])) if key == "off"
                    else float(r["final_test_acc"]) for r in rr
                    if r["variant"] == variant and r.get("lr") == lr]
        at = f" at lr {B.fmt(lr)}" if lr is not None else ""
        relu.append({
            "lr": lr, "off_frozen": of("bn-frozen-beta", "off"), "off_learn": of("bn", "off"),
            "off": E.diff_effect(of("bn", "off"), of("bn-frozen-beta", "off"),
                                 f"ReLU units off per example{at}, beta learnable - frozen"),
            "acc": E.diff_effect(of("bn", "acc"), of("bn-frozen-beta", "acc"),
                                 f"BN-ReLU test accuracy{at}, beta learnable - frozen"),
        })
    return {"arms": arms, "relu": relu}


def _say_arm(arm: dict[str, Any], nums: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Sentences and verdicts of one (data set, init scale) comparison."""
    tag, p, b = arm["tag"], arm["plain"], arm["bn"]
    for k in ("saturated", "drift", "mean_acc", "final_acc"):
        nums[f"{tag}: {k} plain"] = float(np.mean(p[k]))
        nums[f"{tag}: {k} BN"] = float(np.mean(b[k]))
    e1, e2, e3 = arm["sat"], arm["drift"], arm["speed"]
    sp, sb = B.pct(float(np.mean(p["saturated"]))), B.pct(float(np.mean(b["saturated"])))
    if not arm["saturates"]:
        v1 = B.INCONCLUSIVE
        s1 = (f"{tag}: the plain sigmoid network barely saturated ({sp} of units, second half "
              f"of training; the test needs {B.pct(MIN_SATURATION)}), so there was little "
              "saturation for BN to stop.")
    else:
        v1 = E.verdict(e1, -1)
        s1 = (f"{tag}: saturated fraction {sb} with BN vs {sp} without; "
              f"{E.describe(e1, v1, B.pct)}"
              + (" (BN did NOT reduce saturation)." if v1 == B.CONTRADICTS else "."))
    v2, v3 = E.verdict(e2, -1), E.verdict(e3, +1)
    s2 = (f"{tag}: the median input of a last-layer sigmoid travelled "
          f"{B.fmt(float(np.mean(b['drift'])))} widths with BN vs "
          f"{B.fmt(float(np.mean(p['drift'])))} without; {E.describe(e2, v2)}"
          + (" (BN is NOT more stable here)." if v2 == B.CONTRADICTS else "."))
    s3 = (f"{E.describe(e3, v3, B.pct)} (final {B.pct(float(np.mean(b['final_acc'])))} "
          f"vs {B.pct(float(np.mean(p['final_acc'])))})"
          + ("; BN did NOT train faster." if v3 == B.CONTRADICTS else "."))
    for e in (e1, e2, e3):
        nums.update(E.numbers(e))
    return [s1, s2, s3], [v1, v2, v3]


def _say_relu(r: dict[str, Any], nums: dict[str, Any]) -> tuple[str, str]:
    """Sentence and verdict of the beta comparison at one rate."""
    e4, ea = r["off"], r["acc"]
    v4 = E.verdict(e4, -1)
    nums.update(E.numbers(e4))
    nums.update(E.numbers(ea))
    at = f" (lr {B.fmt(r['lr'])})" if r["lr"] is not None else ""
    fr, le = float(np.mean(r["off_frozen"])), float(np.mean(r["off_learn"]))
    nums[f"BN-ReLU off fraction{at}, beta frozen at 0"] = fr
    nums[f"BN-ReLU off fraction{at}, beta learnable"] = le
    s = (f"BN-ReLU{at} at the end of training: {B.pct(fr)} of units off per example with beta "
         f"frozen at 0 vs {B.pct(le)} with a learnable beta; {E.describe(e4, v4, B.pct)}; "
         f"{E.describe(ea, E.verdict(ea, +1), B.pct)}"
         + (" (a learnable beta did NOT lower the off fraction)." if v4 == B.CONTRADICTS
            else "."))
    return s, v4


def conclude(data: dict[str, Any]) -> B.Conclusion:
    m = measure(data)
    nums: dict[str, Any] = {}
    details: list[str] = []
    verdicts: list[str] = []
    for arm in m["arms"]:
        ds, vs = _say_arm(arm, nums)
        details += ds
        verdicts += vs
    for r in m["relu"]:
        d, v = _say_relu(r, nums)
        details.append(d)
        verdicts.append(v)
    verdict = B.combine_verdicts(verdicts)
    head = {
        B.SUPPORTS: "Batch norm behaved as claimed",
        B.CONTRADICTS: "The measurements contradict part of the claim",
        B.INCONCLUSIVE: "The measurements only partly settle the claim",
    }[verdict]
    return B.conclusion(CLAIM, f"{head}. " + " ".join(details), verdict, nums, details)


def _band(ax: Any, runs: list[dict[str, Any]], key_x: str, key_y: str, color: str,
          label: str) -> None:
    n = min(len(r[key_y]) for r in runs)
    P.mean_band(ax, runs[0][key_x][:n], [r[key_y][:n] for r in runs], color=color, label=label)


def _pair(runs: list[dict[str, Any]], ds: str) -> Any:
    """A figure with the without/with BN panels of one data set: ``(fig, [(axis, variant,
    title, runs)])``."""
    fig, axes = P.subplots(1, 2, size=(4.4, 3.4), sharey=False)
    panels = [(axes[0, 0], "plain", "without BN"), (axes[0, 1], "bn", "with BN")]
    return fig, [(ax, v, t, [r for r in runs if r["dataset"] == ds and r["variant"] == v])
                 for ax, v, t in panels]


def _fig_accuracy(runs: list[dict[str, Any]], dss: list[str], path: Path) -> Path:
    fig, axes = P.subplots(1, len(dss), size=(4.6, 3.4))
    for ax, ds in zip(axes[0], dss, strict=True):
        for variant, color, lab in (("plain", P.PLAIN, "sigmoid"), ("bn", P.NORMED, "BN + sigmoid")):
            rs = [r for r in runs if r["dataset"] == ds and r["variant"] == variant]
            if rs:
                _band(ax, rs, "eval_steps", "test_acc", color, lab)
        ax.set_ylim(0, 1)
        P.finish(ax, "training step", "test accuracy", f"{ds}: 3 x 100 sigmoid MLP",
                 legend="lower right")
    return P.save(fig, path)


def _fig_percentiles(runs: list[dict[str, Any]], ds: str, unit: int, path: Path) -> Path:
    fig, panels = _pair(runs, ds)
    for ax, variant, title, rs in panels:
        if not rs:
            continue
        a = np.asarray(rs[0]["last_pcts"], dtype=float)[:, unit, :]  # [T, 3]
        x = rs[0]["probe_steps"][: a.shape[0]]
        for j, (q, ls) in enumerate(((15, ":"), (50, "-"), (85, "--"))):
            ax.plot(x, a[:, j], ls=ls, color=P.PLAIN if variant == "plain" else P.NORMED,
                    label=f"{q}th percentile")
        P.finish(ax, "training step", f"input of sigmoid unit {unit}, last hidden layer",
                 f"{ds}: {title}")
    return P.save(fig, path)


def _fig_fraction(runs: list[dict[str, Any]], ds: str, path: Path) -> Path:
    fig, panels = _pair(runs, ds)
    cmap = ["#fdae61", "#f46d43", "#a50026", "#67001f", "#40004b"]
    for ax, _variant, title, rs in panels:
        if not rs:
            continue
        n = min(len(r["saturated"]) for r in rs)
        a = np.asarray([np.asarray(r["saturated"], dtype=float)[:n] for r in rs])  # [S, T, L]
        for li in range(a.shape[2]):
            P.mean_band(ax, rs[0]["probe_steps"][:n], list(a[:, :, li]),
                        color=cmap[li % len(cmap)], label=f"hidden layer {li + 1}")
        P.finish(ax, "training step", "saturated fraction (probe record)", f"{ds}: {title}")
    top = max(0.05, 1.15 * max(ax.get_ylim()[1] for ax, *_ in panels))
    for ax, *_ in panels:
        ax.set_ylim(0, min(1.0, top))
    return P.save(fig, path)


def _fig_relu(rr: list[dict[str, Any]], ds: str, path: Path) -> Path:
    lrs = sorted({r.get("lr") for r in rr}, key=lambda v: (v is None, v))
    fig, axes = P.subplots(1, len(lrs), size=(5.0, 3.4))
    for ax, lr in zip(axes[0], lrs, strict=True):
        for variant, color, lab in (("bn", P.PLAIN, "BN, beta learnable"),
                                    ("bn-frozen-beta", P.NORMED, "BN, beta frozen at 0")):
            rs = [r for r in rr if r["variant"] == variant and r.get("lr") == lr]
            if rs:
                n = min(len(r["off"]) for r in rs)
                P.mean_band(ax, rs[0]["probe_steps"][:n],
                            [np.asarray(r["off"], dtype=float)[:n].mean(1) for r in rs],
                            color=color, label=lab)
        at = f", lr {B.fmt(lr)}" if lr is not None else ""
        P.finish(ax, "training step", "fraction of units off per example (probe's off_frac)",
                 f"{ds}: 3 x 100 BN-ReLU MLP{at}")
    return P.save(fig, path)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    d = P.figdir(workdir)
    dss = data["datasets"]
    sc0 = (data.get("init_scales") or [None])[0]
    runs = [r for r in data["runs"] if sc0 is None or r.get("scale", sc0) == sc0]
    out = [_fig_accuracy(runs, dss, d / "saturation_accuracy.png"),
           _fig_percentiles(runs, dss[0], int(data["unit"]), d / "saturation_percentiles.png"),
           _fig_fraction(runs, dss[0], d / "saturation_fraction.png")]
    rr = [r for r in data.get("relu_runs", []) if "off" in r]
    if rr:
        out.append(_fig_relu(rr, dss[0], d / "saturation_dead_relu.png"))
    return out
