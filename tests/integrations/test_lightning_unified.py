"""The callback with the unified ``lightning`` package (``lightning.pytorch``), and from a
``LightningCLI`` configuration."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from signalprop.integrations.lightning import SignalpropCallback  # noqa: E402
from signalprop.record import MODEL, Record  # noqa: E402

from ..helpers import mlp  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.net = mlp(8, depth, nn.Tanh, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ds = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g),
                                            torch.randint(0, 2, (64,), generator=g))
        return torch.utils.data.DataLoader(ds, batch_size=16)


def test_one_callback_class_for_both_packages() -> None:
    import pytorch_lightning

    cb = SignalpropCallback()
    assert isinstance(cb, L.Callback) and isinstance(cb, pytorch_lightning.Callback)


def test_unified_trainer(tmp_path) -> None:
    torch.manual_seed(0)
    cb = SignalpropCallback(every=1, out_dir=tmp_path / "sp", warn=False)
    trainer = L.Trainer(max_steps=4, callbacks=[cb], logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", devices=1,
                        gradient_clip_val=0.01)
    trainer.fit(Tiny())
    assert cb.record.steps == [0, 1, 2, 3]
    assert Record.load(tmp_path / "sp" / "record.json.gz").steps == [0, 1, 2, 3]
    s = cb.record.steps[-1]
    assert cb.record.get(s, MODEL, "grad_norm_total_clipped") == pytest.approx(0.01, rel=1e-3)
    assert "signalprop/grad_ratio_first_last" in trainer.callback_metrics


def test_lightning_cli_config(tmp_path) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
trainer:
  max_steps: 3
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  accelerator: cpu
  devices: 1
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: signalprop.integrations.lightning.SignalpropCallback
      init_args:
        every: 1
        warn: false
        out_dir: {tmp_path / "sp"}
""")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(Tiny, args=["fit", "--config", str(cfg)], save_config_kwargs={
            "overwrite": True})
    cbs = [c for c in cli.trainer.callbacks if isinstance(c, SignalpropCallback)]
    assert len(cbs) == 1 and cbs[0].record.steps == [0, 1, 2]
    assert (tmp_path / "sp" / "record.json.gz").exists()
