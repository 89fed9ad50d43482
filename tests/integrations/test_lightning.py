"""SignalpropCallback end to end: a small LightningModule trained with the callback.

Two ``Trainer.fit`` runs in all (Lightning is slow to import and start): a deliberately vanishing
20-layer sigmoid MLP with gradient accumulation and clipping, and a healthy shallow ReLU MLP as
the negative control. Every number is checked against an independent computation made inside
the LightningModule's own hooks.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.loggers import Logger, TensorBoardLogger  # noqa: E402

from signalprop.integrations.lightning import (  # noqa: E402
    CLIPPED_NORM,
    SignalpropCallback,
    SignalpropWarning,
    finding_key,
)
from signalprop.record import MODEL, Record  # noqa: E402

ACCUM = 2
CLIP = 1e-3
BATCH = 16
STEPS = 6


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, *args: object, **kwargs: object) -> None:
        pass


class MLP(pl.LightningModule):
    """An MLP that also keeps, per optimiser step, what the callback should have measured."""

    def __init__(self, depth: int, act: type[nn.Module], he: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = 12
        for _ in range(depth):
            lin = nn.Linear(d, 24)
            if he:
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                nn.init.zeros_(lin.bias)
            layers += [lin, act()]
            d = 24
        layers.append(nn.Linear(d, 4))
        self.net = nn.Sequential(*layers)
        self.micro_losses: list[float] = []
        self.first_out: list[torch.Tensor] = []
        self.step_losses: list[float] = []
        self.step_first_mean: list[float] = []
        self.pre_clip: list[float] = []
        self.weights_before: list[list[torch.Tensor]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        self.first_out.append(self.net[0](x).detach())
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.micro_losses.append(float(loss))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls the module's hook after the callbacks' and before clipping
        self.pre_clip.append(
            float(torch.sqrt(sum(p.grad.double().square().sum() for p in self.parameters())))
        )
        self.step_losses.append(sum(self.micro_losses) / len(self.micro_losses))
        self.step_first_mean.append(float(torch.cat(self.first_out).double().mean()))
        self.weights_before.append([p.detach().clone() for p in self.parameters()])
        self.micro_losses, self.first_out = [], []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader(n: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def _trainer(tmp_path, cb, loggers, **kw) -> pl.Trainer:
    return pl.Trainer(
        callbacks=[cb],
        logger=loggers,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        **kw,
    )


@pytest.fixture(scope="module")
def vanishing(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("tensorboard")  # for the TensorBoardLogger
    tmp = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    model = MLP(depth=20, act=nn.Sigmoid)  # PyTorch's default init: chi_1 << 1
    mem = MemoryLogger()
    tb = TensorBoardLogger(tmp / "tb", name="", version=0)
    # exact forward statistics (no sampling), so they can be checked against the model's own
    cb = SignalpropCallback(
        every=1, diagnose_every=2, out_dir=tmp / "out", probe_kwargs={"max_forward_samples": None}
    )
    trainer = _trainer(
        tmp, cb, [mem, tb], max_steps=STEPS, accumulate_grad_batches=ACCUM, gradient_clip_val=CLIP
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader(BATCH * ACCUM * STEPS))
    sp = [w for w in caught if issubclass(w.category, SignalpropWarning)]
    return model, cb, mem, tb, trainer, sp, tmp


def test_steps_follow_optimizer_steps_under_accumulation(vanishing) -> None:
    model, cb, mem, _, trainer, _, _ = vanishing
    assert trainer.global_step == STEPS
    assert cb.record.steps == list(range(STEPS))
    assert len(model.pre_clip) == STEPS  # one optimiser step per ACCUM micro-batches
    # the loss is the mean over the accumulation window
    loss = [cb.record.get(s, MODEL, "loss") for s in cb.record.steps]
    assert loss == pytest.approx(model.step_losses, rel=1e-5)
    # forward statistics cover every micro-batch of the window, not just the last one
    mean0 = [cb.record.get(s, "net.0", "out_mean") for s in cb.record.steps]
    assert mean0 == pytest.approx(model.step_first_mean, rel=1e-4, abs=1e-6)


def test_global_norm_before_and_after_clipping(vanishing) -> None:
    model, cb, *_ = vanishing
    pre = [cb.record.get(s, MODEL, "grad_norm_total") for s in cb.record.steps]
    post = [cb.record.get(s, MODEL, CLIPPED_NORM) for s in cb.record.steps]
    assert pre == pytest.approx(model.pre_clip, rel=1e-5)
    assert all(p > 10 * CLIP for p in pre)  # so clipping did act
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    assert post == pytest.approx([CLIP * p / (p + 1e-6) for p in pre], rel=1e-5)
    assert cb.record.meta["gradient_clip_val"] == CLIP
    assert cb.record.meta["accumulate_grad_batches"] == ACCUM


def test_update_ratios_match_weights_before_and_after(vanishing) -> None:
    model, cb, *_ = vanishing
    params = [n for n, _ in model.named_parameters()]
    last = cb.record.steps[-1]
    after = dict(model.named_parameters())
    for name, before in zip(params, model.weights_before[last], strict=True):
        want = float(
            torch.linalg.vector_norm(after[name].detach().double() - before.double())
            / torch.linalg.vector_norm(before.double())
        )
        got = cb.record.get(last, name, "update_ratio")
        assert got == pytest.approx(want, rel=1e-3, abs=1e-9), name


def test_logger_receives_per_layer_metrics_not_progress_bar(vanishing) -> None:
    model, cb, mem, _, trainer, _, _ = vanishing
    ours = [(s, m) for s, m in mem.calls if any(k.startswith("signalprop/") for k in m)]
    assert [s for s, _ in ours] == cb.record.steps
    step, metrics = ours[0]
    layers = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    for n in layers:
        key = f"signalprop/grad_norm/{n}"
        assert metrics[key] == pytest.approx(cb.record.get(step, n, "grad_norm"), rel=1e-6)
    assert "signalprop/saturated_frac/net.1" in metrics
    assert "signalprop/grad_norm_total_clipped" in metrics and "signalprop/loss" in metrics
    # the default selection leaves percentiles out of the logger
    assert not any("/out_p50/" in k for k in metrics)
    assert not any(k.startswith("signalprop/") for k in trainer.progress_bar_metrics)


def test_vanishing_model_warns_once_per_finding(vanishing) -> None:
    _, cb, _, _, _, warned, _ = vanishing
    kinds = [str(w.message).split(" ")[1] for w in warned]
    assert "vanishing_gradients" in kinds
    msg = next(str(w.message) for w in warned if "vanishing_gradients" in str(w.message))
    assert "net.0" in msg and "Try:" in msg
    # diagnosed at steps 0, 2, 4 and at the end: still one warning per (kind, layer range)
    keys = [k for k in cb.warned]
    assert len(warned) == len(keys) == len(set(keys))
    assert {finding_key(f) for f in cb.findings} <= cb.warned
    assert any(f.kind == "vanishing_gradients" for f in cb.findings)


def test_files_written_at_end(vanishing) -> None:
    _, cb, _, tb, _, _, tmp = vanishing
    rec = Record.load(tmp / "out" / "record.json.gz")
    assert rec.steps == cb.record.steps
    assert rec.get(0, MODEL, "loss") == pytest.approx(cb.record.get(0, MODEL, "loss"))
    findings = json.loads((tmp / "out" / "findings.json").read_text())
    assert "vanishing_gradients" in [f["kind"] for f in findings]
    html = (tmp / "out" / "report.html").read_text()  # the doctor's page, figures inlined
    assert "<html" in html.lower() and "net.0" in html and "data:image/png;base64" in html
    # histograms went into the TensorBoardLogger's own event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert "signalprop/depth/log10_grad_norm" in acc.Tags()["histograms"]
    assert "signalprop/grad_norm/net.0.weight" in acc.Tags()["scalars"]
    # vanishing: the depth histogram spans many decades
    h = acc.Histograms("signalprop/depth/log10_grad_norm")[0].histogram_value
    assert h.max - h.min > 6


def test_healthy_model_gives_no_gradient_warning_bf16(tmp_path) -> None:
    torch.manual_seed(0)
    model = MLP(depth=3, act=nn.ReLU, he=True)
    cb = SignalpropCallback(every=2, diagnose_every=2, save=False, log_metrics=None)
    # bf16 autocast: a different precision plugin, bf16 activations reach the probe
    trainer = _trainer(tmp_path, cb, False, max_steps=5, precision="bf16-mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader(BATCH * 5))
    assert cb.record.steps == [0, 2, 4]
    sp = [str(w.message) for w in caught if issubclass(w.category, SignalpropWarning)]
    assert not any("vanishing" in m or "exploding" in m for m in sp), sp
    assert not (tmp_path / "signalprop").exists()  # save=False
    loss = [cb.record.get(s, MODEL, "loss") for s in cb.record.steps]
    assert loss == pytest.approx([model.step_losses[s] for s in cb.record.steps], rel=1e-5)
    assert 0.0 <= cb.record.get(0, "net.1", "dead_frac") <= 1.0
    # without clipping the clipped norm equals the raw one
    for s in cb.record.steps:
        assert cb.record.get(s, MODEL, CLIPPED_NORM) == pytest.approx(
            cb.record.get(s, MODEL, "grad_norm_total"), rel=1e-5
        )
    assert not cb.probe.attached  # hooks removed at the end


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="every"):
        SignalpropCallback(every=0)
    with pytest.raises(ValueError, match="log_metrics"):
        SignalpropCallback(log_metrics="some")
    with pytest.raises(ValueError, match="optimizer"):
        SignalpropCallback(probe_kwargs={"optimizer": None})
    with pytest.raises(ValueError, match="diagnose_every"):
        SignalpropCallback(diagnose_every=-1)
    with pytest.raises(ValueError, match="managed|manages"):
        SignalpropCallback(probe_kwargs={"schedule": 3})


def test_saved_record_diagnoses_like_the_callback(vanishing, capsys) -> None:
    from signalprop.cli import main

    _, cb, _, _, _, _, tmp = vanishing
    assert main(["diagnose", str(tmp / "out" / "record.json.gz"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["findings"]
    assert got == [f.to_dict() for f in cb.findings]


def test_callback_metrics_drive_early_stopping(tmp_path) -> None:
    """The first/last gradient ratio reaches trainer.callback_metrics: EarlyStopping stops a
    run whose gradients vanish; ModelCheckpoint can monitor the same key."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    from signalprop.integrations.common import summary_metrics

    torch.manual_seed(0)
    model = MLP(depth=20, act=nn.Sigmoid)
    cb = SignalpropCallback(every=1, diagnose_every=None, save=False, warn=False,
                            log_metrics=None)
    key = "signalprop/grad_ratio_first_last"
    stop = EarlyStopping(monitor=key, mode="max", divergence_threshold=1e-3,
                         check_on_train_epoch_end=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=key, mode="max")
    trainer = pl.Trainer(callbacks=[cb, stop, ckpt], logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False,
                         max_epochs=5, accelerator="cpu", devices=1)
    trainer.fit(model, _loader(BATCH * 3))
    last = cb.record.steps[-1]
    want = summary_metrics(cb.record.data[last])[key]
    assert float(trainer.callback_metrics[key]) == pytest.approx(want, rel=1e-6)
    assert want < 1e-3  # vanishing
    assert trainer.current_epoch == 1 and trainer.should_stop  # stopped after the first epoch
    assert ckpt.best_model_path  # ModelCheckpoint found its monitor
