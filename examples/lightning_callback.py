"""signalprop inside PyTorch Lightning: one callback.

``SignalpropCallback`` probes the LightningModule during ``Trainer.fit``, logs per-layer
statistics through the trainer's loggers (here TensorBoard, as ``signalprop/<metric>/<layer>``,
never in the progress bar), warns once per diagnosis finding, and writes ``record.json.gz``,
``findings.json`` and the doctor's ``report.html`` at the end. It works with gradient accumulation
and records the global gradient norm before and after Lightning's gradient clipping.

The model is deliberately deep and sigmoid, so the callback has something to say.

    python examples/lightning_callback.py [--steps 60] [--out examples-out/lightning]
"""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch
from _common import mlp_layers, parser
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

import signalprop
from signalprop.integrations.lightning import SignalpropCallback, SignalpropWarning


class DeepSigmoid(pl.LightningModule):
    def __init__(self, d_in: int, n_classes: int, depth: int = 16, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(*mlp_layers(d_in, depth, width, nn.Sigmoid),
                                 nn.Linear(width, n_classes))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # your own logging is untouched
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    args = parser(__doc__, 60, "examples-out/lightning", "optimiser steps").parse_args()
    torch.manual_seed(0)

    data = signalprop.load_dataset("digits")
    model = DeepSigmoid(data.x_train.shape[1], data.num_classes)
    callback = SignalpropCallback(every=5, diagnose_every=20, out_dir=args.out / "signalprop")
    trainer = pl.Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=2,  # 2 micro-batches of 32 per optimiser step
        gradient_clip_val=1.0,
        callbacks=[callback],
        logger=TensorBoardLogger(args.out, name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SignalpropWarning)
        trainer.fit(model, data.loader(batch_size=32))
    for w in caught:
        if issubclass(w.category, SignalpropWarning):
            print(f"WARNING {w.message}")

    rec = callback.record
    mdl = signalprop.record.MODEL
    s = rec.steps[-1]
    print(f"\nrecorded {len(rec)} of {trainer.global_step} optimiser steps")
    print(f"step {s}: loss {rec.get(s, mdl, 'loss'):.3f}, global grad norm "
          f"{rec.get(s, mdl, 'grad_norm_total'):.3g} before clipping, "
          f"{rec.get(s, mdl, 'grad_norm_total_clipped'):.3g} after")
    print("files:", ", ".join(str(p) for p in callback.written.values()))
    print(f"tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
