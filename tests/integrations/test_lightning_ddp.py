"""The Lightning callback under DDP (2 CPU processes, gloo, ``ddp_spawn``): per-layer values are
combined across ranks before they are recorded, and rank 0's record equals a single process's
on the whole global batch."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from signalprop.integrations.lightning import SignalpropCallback  # noqa: E402
from signalprop.record import MODEL, Record  # noqa: E402

GLOBAL_BATCH = 16


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                 nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # rank r takes samples r, r + W, ...: the ranks' batches together are the single
        # process's batch (Lightning's own distributed sampler is off: it shuffles)
        g = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g),
                                            torch.randint(0, 3, (64,), generator=g))
        w, r = self.trainer.world_size, self.trainer.global_rank
        part = torch.utils.data.Subset(ds, list(range(r, len(ds), w)))
        return torch.utils.data.DataLoader(part, batch_size=GLOBAL_BATCH // w, shuffle=False)


def _fit(tmp_path, devices: int) -> Record:
    torch.manual_seed(0)
    model = Net()
    out = tmp_path / f"sp{devices}"
    cb = SignalpropCallback(every=1, out_dir=out, warn=False, report=False, log_metrics=None)
    trainer = L.Trainer(
        max_steps=3, callbacks=[cb], logger=False, default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        accelerator="cpu", devices=devices, gradient_clip_val=0.05,
        strategy="ddp_spawn" if devices > 1 else "auto", use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return Record.load(out / "record.json.gz")  # written by rank 0


@pytest.mark.slow
def test_ddp_record_equals_single_process(tmp_path) -> None:
    ddp = _fit(tmp_path, 2)
    one = _fit(tmp_path, 1)
    assert ddp.meta["world_size"] == 2 and "world_size" not in one.meta
    assert ddp.steps == one.steps == [0, 1, 2]
    n = 0
    for s in one.steps:
        for layer, d in one.data[s].items():
            for m in ("grad_norm", "out_grad_norm", "update_ratio", "out_std", "loss",
                      "grad_norm_total", "grad_norm_total_clipped"):
                if m in d:
                    assert ddp.get(s, layer, m) == pytest.approx(d[m], rel=1e-5), (s, layer, m)
                    n += 1
    assert n > 40
    assert one.get(0, MODEL, "grad_norm_total") > 0.05  # clipping was active
