"""Hugging Face Trainer end to end: a tiny BERT built from a config (no download), gradient
accumulation and clipping on, TensorBoard as the ``report_to`` backend."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from signalprop.integrations.common import SignalpropWarning  # noqa: E402
from signalprop.integrations.transformers import (  # noqa: E402
    CLIPPED_NORM,
    TRAINER_NORM,
    SignalpropCallback,
)
from signalprop.record import MODEL, Record  # noqa: E402

from ..helpers import mlp  # noqa: E402

MAX_GRAD_NORM = 0.05


def _data(n: int = 32, seq: int = 8, vocab: int = 50, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    labels = (ids[:, 0] % 2).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": labels[i]} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_grad_norm=MAX_GRAD_NORM, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=["tensorboard"],
        use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
    )
    model = transformers.BertForSequenceClassification(cfg)
    cb = SignalpropCallback(every=1, diagnose_every=2)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                                   callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SignalpropWarning)
        trainer.train()
    return cb, trainer, tmp_path


def test_steps_are_optimizer_steps_and_grad_norm_is_before_clipping(bert_run) -> None:
    cb, trainer, _ = bert_run
    rec = cb.record
    assert rec.steps == list(range(trainer.state.global_step)) == [0, 1, 2, 3, 4]
    for s in rec.steps:
        ours = rec.get(s, MODEL, "grad_norm_total")
        theirs = rec.get(s, MODEL, TRAINER_NORM)
        clipped = rec.get(s, MODEL, CLIPPED_NORM)
        # the Trainer's own pre-clip norm and ours agree; clipping then brought it down
        assert ours == pytest.approx(theirs, rel=1e-5), (s, ours, theirs)
        assert ours > MAX_GRAD_NORM * 2
        assert clipped == pytest.approx(MAX_GRAD_NORM, rel=1e-3)
    # per-parameter norms compose to the global one (an oracle on the bookkeeping)
    s = rec.steps[-1]
    per = [rec.get(s, n, "grad_norm") for n in rec.layer_names(role="param")]
    per = [v for v in per if not math.isnan(v)]
    assert math.sqrt(sum(v * v for v in per)) == pytest.approx(
        rec.get(s, MODEL, "grad_norm_total"), rel=1e-5)
    assert rec.meta["gradient_accumulation_steps"] == 2
    assert rec.meta["source"] == "transformers"


def test_loss_is_the_window_mean_and_forward_sees_every_micro_batch(bert_run) -> None:
    cb, trainer, _ = bert_run
    rec = cb.record
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    ratios = set()
    for s in rec.steps:
        # ours is the mean micro-batch loss of the window; the Trainer logs either that mean or
        # (transformers 5.x, models without loss kwargs) the sum over the 2 micro-batches
        r = logged[s + 1] / rec.get(s, MODEL, "loss")
        assert min(abs(r - 1), abs(r - 2)) < 1e-3, (s, r)
        ratios.add(round(r))
    assert len(ratios) == 1  # one convention throughout
    assert rec.has("out_grad_norm") and rec.has("update_ratio")


def test_summary_reaches_the_report_to_backend(bert_run) -> None:
    pytest.importorskip("tensorboard")
    from signalprop.integrations.tensorboard import load_scalars

    cb, trainer, tmp_path = bert_run
    events = sorted((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert events, "the TensorBoard callback wrote nothing"
    scalars = load_scalars(events[0].parent)
    key = "train/signalprop/grad_ratio_first_last"
    assert key in scalars, sorted(scalars)
    steps, vals = scalars[key]
    rec = cb.record
    from signalprop.integrations.common import summary_metrics

    want = [summary_metrics(rec.data[s])["signalprop/grad_ratio_first_last"] for s in rec.steps]
    assert list(steps) == [s + 1 for s in rec.steps]  # the Trainer logs at global_step
    assert list(vals) == pytest.approx(want, rel=1e-5)
    assert "train/signalprop/grad_norm_total" in scalars
    # the Trainer's log history holds them too
    assert any("signalprop/grad_norm_total" in h for h in trainer.state.log_history)


def test_files_written_and_readable(bert_run) -> None:
    cb, _, tmp_path = bert_run
    out = tmp_path / "out" / "signalprop"
    assert cb.written["record"] == out / "record.json.gz"
    rec = Record.load(out / "record.json.gz")
    assert rec.steps == cb.record.steps
    assert (out / "findings.json").exists()
    assert "<html" in (out / "report.html").read_text()[:500].lower()


class DeepSigmoid(nn.Module):
    """A model the Trainer can train (dict in, ModelOutput-like dict out) whose gradients
    vanish."""

    def __init__(self, depth: int = 14) -> None:
        super().__init__()
        self.net = mlp(16, depth, nn.Sigmoid, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_vanishing_model_warns_once_per_finding(tmp_path) -> None:
    torch.manual_seed(0)
    data = [{"x": torch.randn(16), "labels": torch.tensor(i % 2)} for i in range(64)]
    cb = SignalpropCallback(every=1, diagnose_every=2, save=False)
    trainer = transformers.Trainer(
        model=DeepSigmoid(), args=_args(tmp_path, max_steps=8, report_to=[],
                                        learning_rate=0.1, max_grad_norm=1.0),
        train_dataset=data, callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    msgs = [str(w.message) for w in caught if issubclass(w.category, SignalpropWarning)]
    assert any("vanishing" in m for m in msgs), msgs
    assert len(msgs) == len(set(m.split(" at step")[0] for m in msgs))  # once each
    assert "vanishing_gradients" in [f.kind for f in cb.findings]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="every"):
        SignalpropCallback(every=0)
    with pytest.raises(ValueError, match="optimizer"):
        SignalpropCallback(probe_kwargs={"optimizer": None})


def test_saved_record_diagnoses_like_the_callback(bert_run, capsys) -> None:
    import json

    from signalprop.cli import main

    cb, _, tmp_path = bert_run
    assert main(["diagnose", str(tmp_path / "out" / "signalprop"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["findings"]
    assert got == [f.to_dict() for f in cb.findings]


def test_runs_first_among_the_trainers_callbacks(bert_run) -> None:
    cb, trainer, _ = bert_run
    # before the TensorBoard reporter, so the reporter sees the summary in the same logs dict
    assert trainer.callback_handler.callbacks[0] is cb
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert "TensorBoardCallback" in names
