"""Weights & Biases from a plain PyTorch loop, offline: one depth-profile chart per metric
(log10 gradient norm vs layer, a line per step) and a dozen summary scalars, instead of one chart
per layer.

    python examples/wandb_writer.py [--steps 60] [--out examples-out/wandb]
    wandb sync examples-out/wandb/wandb/offline-run-*   # later, to upload
"""

from __future__ import annotations

import os

import torch
import wandb
from _common import parser
from torch import nn

import signalprop
from signalprop.integrations.wandb import wandb_writer
from signalprop.train import fit


def main() -> None:
    args = parser(__doc__, 60, "examples-out/wandb").parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = signalprop.load_dataset("digits")
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.LazyLinear(64), nn.Tanh())],
                          nn.LazyLinear(data.num_classes))
    model(data.x_train[:2])  # materialise the lazy layers
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    run = wandb.init(project="signalprop-example", dir=str(args.out), mode="offline")
    writer = wandb_writer(run, profile_every=5)
    probe = signalprop.Probe(model, schedule=5, on_record=[writer])
    fit(model, data, nn.functional.cross_entropy, steps=args.steps, optimizer=opt, probe=probe)
    writer.flush()
    summary = {k: run.summary[k] for k in ("signalprop/loss", "signalprop/grad_ratio_first_last")}
    run.finish()
    print(f"logged {len(probe.record)} steps; last summary: "
          + ", ".join(f"{k} = {v:.3g}" for k, v in summary.items()))
    print(f"offline run in {args.out / 'wandb'}")


if __name__ == "__main__":
    main()
