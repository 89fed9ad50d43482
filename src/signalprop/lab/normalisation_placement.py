"""Layer-norm placement in transformers: post-LN vs pre-LN, with and without warm-up, vs depth.

Xiong et al. 2020 ("On Layer Normalization in the Transformer Architecture") showed that in the
original post-LN transformer (LayerNorm after each residual sum) the expected gradient of the
parameters near the output is large at initialisation, so a large learning rate without warm-up
makes training unstable; in the pre-LN transformer (LayerNorm at the input of each sub-block, a
final LayerNorm at the end) the gradients are well behaved across layers and warm-up can be
dropped. This study builds both from ``torch.nn.TransformerEncoderLayer`` (the pre-LN one through
the remedies registry's ``pre_ln`` transform), trains them with the package's loop
(:func:`signalprop.train.fit`, ``warmup``) on a synthetic token task, and reads the gradient
profiles from the probe's record at step 0.
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
from signalprop.remedies import get_remedy

VERSION = 1
NAME = "normalisation-placement"
TITLE = "Layer-norm placement in transformers: post-LN vs pre-LN, with and without warm-up"
QUESTION = (
    "Why do post-LN transformers need learning-rate warm-up, and does moving layer norm in front "
    "of each sub-block (pre-LN) remove the need?"
)
CLAIM = (
    "At initialisation the post-LN transformer's parameter gradients grow towards the output "
    "layers while pre-LN keeps them level; without warm-up post-LN trains worse than pre-LN at the "
    "same rate, and warm-up closes the gap (Xiong et al. 2020)."
)
SETUP = (
    "Synthetic token task: sequences of 16 tokens over 8 symbols with a planted majority symbol "
    "(each position is that symbol with probability 0.35); the class is the most frequent symbol "
    "(ties: the smallest). Model: token + learned position embeddings, a stack of "
    "torch.nn.TransformerEncoderLayer (d_model 32, 2 heads, feed-forward 64, no dropout, ReLU), "
    "mean pooling, a linear classifier. post-LN is PyTorch's default; pre-LN is made by the "
    "remedies registry's pre_ln transform (same parameters, plus the final LayerNorm). Trained by "
    "signalprop.train.fit with Adam at one rate for every arm (Xiong et al. compare placements at "
    "the same rate), with and without the registry's linear warm-up; metric: final test "
    "accuracy (mean over seeds, Welch 95% intervals); trainable = test accuracy >= 0.8. At "
    "step 0 the probe records the gradient norm of each block's feed-forward weight (Xiong et "
    "al.'s Figure 3 quantity) and ||dL/dx_l|| on the residual stream after each block."
)
REFERENCES = [
    "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture",
    "Liu et al. 2020, Understanding the Difficulty of Training Transformers (Admin)",
    "Vaswani et al. 2017, Attention is all you need (post-LN, warm-up)",
]
CAPTIONS = {
    "placement_gradient_profile": "Gradient norm of each block's feed-forward weight (left) and "
    "||dL/dx_l|| on the residual stream (right) vs block index at initialisation, deepest stack, "
    "mean over seeds with 95% intervals.",
    "placement_accuracy": "Final test accuracy vs depth for post-LN and pre-LN with and without "
    "warm-up (mean over seeds, 95% intervals).",
}

ARMS = ("post-LN", "post-LN + warmup", "pre-LN", "pre-LN + warmup")
#: Test accuracy at or above this counts as trainable (the pre-LN + warm-up reference reaches it
#: at every depth in the study's budget; the conclusion says when it does not).
TRAINABLE_ACC = 0.8
VOCAB, LENGTH, D_MODEL, HEADS, FFN = 8, 16, 32, 2, 64

SMOKE: dict[str, Any] = {"depths": [1, 2], "steps": 10, "seeds": [0, 1, 2],
                         "train_size": 256, "test_size": 128}


def get_config(quick: bool) -> dict[str, Any]:
    return {
        "depths": [2, 6] if quick else [4, 12, 24],
        "steps": 100 if quick else 150,
        "batch_size": 64,
        "lr": 1e-2,
        "warmup_fraction": 0.1,
        "seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
        "train_size": 8192,
        "test_size": 1000,
        "device": "cpu",
    }


def majority_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, LENGTH] tokens, y [n] = the most frequent token (ties: the smallest)."""
    planted = torch.randint(0, VOCAB, (n, 1), generator=generator)
    noise = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    keep = torch.rand(n, LENGTH, generator=generator) < 0.35
    x = torch.where(keep, planted.expand(-1, LENGTH), noise)
    counts = F.one_hot(x, VOCAB).sum(1)
    return x, counts.argmax(1)


class Encoder(nn.Module):
    """Embeddings, ``nn.TransformerEncoder`` (post-LN), mean pooling, a linear head."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.randn(LENGTH, D_MODEL) * 0.02)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FFN, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(x) + self.pos).mean(1))


def build(arm: str, depth: int, seed: int) -> tuple[nn.Module, float]:
    """The arm's model and its warm-up fraction (remedy registry: ``pre_ln``, ``warmup``)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid: {', '.join(ARMS)}")
    torch.manual_seed(seed)
    model: nn.Module = Encoder(depth)
    if arm.startswith("pre-LN"):
        model = get_remedy("pre_ln").transform(model, None)
    warm = float(get_remedy("warmup").warmup) if arm.endswith("warmup") else 0.0
    return model, warm


def profiles(record: Any, depth: int, pre: bool) -> dict[str, list[float]]:
    """At step 0: ||dL/dW|| of each block's second feed-forward weight, and ||dL/dx_l|| on the
    residual stream after each block. post-LN: the stream after block l is norm2's output;
    pre-LN: the feed-forward output is added to the stream as it is, so its gradient is the
    stream's."""
    g = record.at(0, "grad_norm")
    o = record.at(0, "out_grad_norm")
    ffn = [g.get(f"encoder.layers.{i}.linear2.weight", math.nan) for i in range(depth)]
    site = "linear2" if pre else "norm2"
    stream = [o.get(f"encoder.layers.{i}.{site}", math.nan) for i in range(depth)]
    return {"ffn_grad": ffn, "stream_grad": stream}


def _one(config: dict[str, Any], arm: str, depth: int, seed: int) -> dict[str, Any]:
    dev = config["device"]
    xtr, ytr = majority_task(config["train_size"], torch.Generator().manual_seed(1))
    xte, yte = majority_task(config["test_size"], torch.Generator().manual_seed(2))
    model, warm = build(arm, depth, seed)
    steps = int(config["steps"])
    res = nets.fit(model, (xtr, ytr), F.cross_entropy, steps=steps, optimizer="adam",
              lr=config["lr"], batch_size=config["batch_size"],
              probe={"forward": False}, schedule=[0], warmup=int(round(warm * steps)),
              device=dev, seed=seed)
    model.eval()
    with torch.no_grad():
        out = model(xte.to(dev))
        acc = float((out.argmax(1) == yte.to(dev)).float().mean())
        tl = float(F.cross_entropy(out, yte.to(dev)))
    return {"arm": arm, "depth": depth, "seed": seed, "diverged": res.diverged,
            "train_loss": res.final_loss, "test_acc": acc if math.isfinite(tl) else 1 / VOCAB,
            "test_loss": tl, **profiles(res.record, depth, arm.startswith("pre")),
            "wall_s": res.wall_time}


def run(config: dict[str, Any], workdir: str | Path) -> dict[str, Any]:
    key = {k: v for k, v in config.items() if k not in ("depths", "seeds")}
    runs = B.cached_cells(workdir, [B.Cell({**key, "arm": a, "depth": d, "seed": s}, _one,
                                           (config, a, d, s), tag=f"d{d}")
                                    for d in config["depths"] for a in ARMS
                                    for s in config["seeds"]],
                          workers=config.get("workers", 1))
    return {"runs": runs, "depths": config["depths"], "steps": config["steps"],
            "lr": config["lr"]}


# --- analysis ---------------------------------------------------------------------------------
def _sel(runs: list[dict[str, Any]], arm: str, depth: int) -> list[dict[str, Any]]:
    return [r for r in runs if r["arm"] == arm and r["depth"] == depth]


def last_first(r: dict[str, Any], key: str = "ffn_grad") -> float:
    """Last block's gradient norm over the first block's."""
    g = r.get(key) or []
    return g[-1] / g[0] if len(g) >= 2 and g[0] > 0 else math.nan


def conclude(data: dict[str, Any]) -> B.Conclusion:
    runs, depths = data["runs"], data["depths"]
    D = max(depths)
    nums: dict[str, Any] = {"depths": depths, "steps": data["steps"], "lr": data["lr"],
                            "trainable accuracy": TRAINABLE_ACC}
    accs = {(a, d): [r["test_acc"] for r in _sel(runs, a, d)] for a in ARMS for d in depths}
    for (a, d), v in accs.items():
        nums[f"{a} depth {d} accuracy"] = float(np.mean(v)) if v else math.nan
    # 1. gradient profile at init (Xiong et al. Fig. 3): last/first FFN-weight gradient
    prof = E.log_ratio_effect([last_first(r) for r in _sel(runs, "post-LN", D)],
                              [last_first(r) for r in _sel(runs, "pre-LN", D)],
                              f"(last/first FFN gradient) post-LN over pre-LN, depth {D}")
    v1 = E.verdict(prof, +1)
    # 2. without warm-up, pre-LN trains better than post-LN at the deepest stack
    nw = E.diff_effect(accs[("pre-LN", D)], accs[("post-LN", D)],
                       f"accuracy pre-LN - post-LN (no warm-up, depth {D})")
    v2 = E.verdict(nw, +1)
    # 3. warm-up helps post-LN
    wu = E.diff_effect(accs[("post-LN + warmup", D)], accs[("post-LN", D)],
                       f"accuracy post-LN with - without warm-up (depth {D})")
    v3 = E.verdict(wu, +1)
    for e in (prof, nw, wu):
        nums.update(E.numbers(e))
    ref = float(np.mean(accs[("pre-LN + warmup", D)])) if accs[("pre-LN + warmup", D)] else 0.0
    details = [
        f"post-LN last/first FFN gradient {E.mean_effect([last_first(r) for r in _sel(runs, 'post-LN', D)]).text()}, "
        f"pre-LN {E.mean_effect([last_first(r) for r in _sel(runs, 'pre-LN', D)]).text()}.",
        "Accuracy by depth: " + "; ".join(
            f"{a}: " + ", ".join(f"{d} blocks {B.pct(nums[f'{a} depth {d} accuracy'])}"
                                 for d in depths) for a in ARMS) + ".",
    ]
    if ref < TRAINABLE_ACC:
        # the budget is too small for the reference arm: the trainability part says nothing
        details.append(f"The reference (pre-LN + warm-up) reaches only {B.pct(ref)} at depth {D}, "
                       f"below the trainability criterion {B.pct(TRAINABLE_ACC)}: the training "
                       "comparison is not decisive at this budget.")
        v2 = v3 = B.INCONCLUSIVE
    verdict = B.combine_verdicts([v1, v2, v3])
    if verdict != B.SUPPORTS and v1 == B.SUPPORTS and B.INCONCLUSIVE in (v2, v3) and \
            "contradicts" not in (v2, v3):
        verdict = B.INCONCLUSIVE
    sentence = (
        f"At depth {D}, Adam {data['lr']} for {data['steps']} steps: "
        f"{E.describe(prof, v1)}; {E.describe(nw, v2, B.pct)}; {E.describe(wu, v3, B.pct)}."
    )
    return B.conclusion(CLAIM, sentence, verdict, nums, details)


def figures(data: dict[str, Any], workdir: str | Path) -> list[Path]:
    runs, depths = data["runs"], data["depths"]
    D = max(depths)
    colors = dict(zip(ARMS, [P.PLAIN, "#ff7f0e", P.NORMED, P.THIRD], strict=True))
    fig, axes = P.subplots(1, 2, size=(4.4, 3.4))
    for ax, key, ylabel in ((axes[0, 0], "ffn_grad", "||dL/dW_ffn|| at init"),
                            (axes[0, 1], "stream_grad", "||dL/dx_l|| (residual stream) at init")):
        for a in ("post-LN", "pre-LN"):
            rows = [r[key] for r in _sel(runs, a, D) if r.get(key)]
            if rows:
                P.mean_band(ax, np.arange(1, D + 1), [np.log10(np.maximum(np.asarray(v, float),
                                                                          1e-30)) for v in rows],
                            color=colors[a], label=a)
        ax.set_xlabel("block")
        ax.set_ylabel("log10 " + ylabel)
        ax.set_title(f"{D} blocks")
        ax.legend(fontsize=7)
    out = [P.save(fig, P.figdir(workdir) / "placement_gradient_profile.png")]
    fig, axes = P.subplots(1, 1, size=(5.2, 3.6))
    ax = axes[0, 0]
    for i, a in enumerate(ARMS):
        effs = [E.mean_effect([r["test_acc"] for r in _sel(runs, a, d)], a) for d in depths]
        P.errorbars(ax, np.asarray(depths, float) * (1 + 0.03 * (i - 1.5)), effs,
                    color=colors[a], label=a)
    ax.axhline(TRAINABLE_ACC, color="#555555", ls="--", lw=1, label="trainable")
    ax.set_xscale("log")
    ax.set_xticks(depths)
    ax.set_xticklabels([str(d) for d in depths])
    ax.set_xlabel("blocks")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    out.append(P.save(fig, P.figdir(workdir) / "placement_accuracy.png"))
    return out
