"""Zoo: Hugging Face BERT (post-LN) and GPT-2 (pre-LN) from tiny configs (random init, nothing
downloaded), trained on DataLoaders of dict batches through ``doctor`` and ``trial``.

Truth computed here: the norm placement by hooks (what each LayerNorm actually receives), the
trivial baseline from the labels (entropy of their frequencies), learnability by construction
(labels that are a function of the input vs labels independent of it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from signalprop.doctor import doctor
from signalprop.trial import trial

from .zoo_helpers import finding

transformers = pytest.importorskip("transformers")

V, T, N = 40, 10, 256
#: never prescribed to a transformer: already there (skips, norms) or cannot apply
WRONG_FOR_TRANSFORMERS = {"residual", "highway", "batchnorm", "fewer_layers", "critical_init"}


def _bert(num_labels: int = 3) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _entropy(labels: torch.Tensor, n: int) -> float:
    p = np.bincount(labels.reshape(-1).numpy(), minlength=n) / labels.numel()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


class FreshBatches:
    """An endless stream of new random dict batches whose labels are independent of the inputs:
    nothing to learn and nothing to memorise (the truth, by construction)."""

    def __init__(self, n_batches: int = 400, seed: int = 5) -> None:
        self.n_batches, self.seed, self.labels = n_batches, seed, []

    def __iter__(self):  # noqa: ANN204
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.n_batches):
            y = torch.randint(0, 3, (32,), generator=g)
            self.labels.append(y)
            yield {"input_ids": torch.randint(1, V, (32, T), generator=g), "labels": y}


def _bert_loader(learnable: bool) -> tuple[object, torch.Tensor]:
    if not learnable:
        stream = FreshBatches()
        labels = torch.cat([b["labels"] for b in FreshBatches(60)])
        return stream, labels
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (N, T), generator=g)
    labels = ids[:, 0] % 3
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long),
             "labels": labels[i]} for i in range(N)]
    return DataLoader(rows, batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(0)), labels


def _gpt2_loader(learnable: bool) -> tuple[object, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    if learnable:  # counting sequences: token t+1 = token t + 1 (mod V)
        ids = (torch.randint(0, V, (N, 1), generator=g) + torch.arange(T)) % V
    else:  # i.i.d. uniform tokens, each batch seen once: nothing to learn or memorise
        ids = torch.randint(0, V, (60 * 32, T), generator=g)
        return [{"input_ids": ids[i:i + 32], "labels": ids[i:i + 32]}
                for i in range(0, len(ids), 32)], ids
    rows = [{"input_ids": ids[i], "labels": ids[i]} for i in range(N)]
    return DataLoader(rows, batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(0)), ids


def test_norm_placement_truth_by_hooks() -> None:
    """BERT adds the residual *before* its LayerNorm (post-LN); GPT-2 normalises the block
    input (pre-LN). Measured on what the norms receive; the doctor's facts must agree."""
    from signalprop.diagnosis.architecture import architecture_facts

    torch.manual_seed(0)
    bert = _bert().eval()
    layer = bert.bert.encoder.layer[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.attention.output.LayerNorm.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("ln_in", a[0])),
        layer.attention.output.dense.register_forward_hook(
            lambda m, a, o: seen.__setitem__("dense", o)),
        layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("block_in", a[0])),
    ]
    bert(input_ids=torch.randint(0, V, (2, T)))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["ln_in"], seen["dense"] + seen["block_in"])
    gpt = _gpt2().eval()
    block = gpt.transformer.h[0]
    hooks = [block.ln_1.register_forward_pre_hook(lambda m, a: seen.__setitem__("ln1", a[0])),
             block.register_forward_pre_hook(lambda m, a: seen.__setitem__("gin", a[0]))]
    gpt(input_ids=torch.randint(0, V, (2, T)))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["ln1"], seen["gin"])
    fb, fg = architecture_facts(bert), architecture_facts(gpt)
    assert (fb["norm_placement"], fg["norm_placement"]) == ("post", "pre")
    assert fb["residual"] is fg["residual"] is True and fb["transformer"] and fg["transformer"]
    assert not fb["sequential_blocks"] and not fb["pre_ln_switchable"]


@pytest.mark.parametrize("learnable", [True, False])
def test_bert_dict_batches_through_doctor(learnable: bool) -> None:
    torch.manual_seed(0)
    loader, labels = _bert_loader(learnable)
    h = _entropy(labels, 3)
    model = _bert()
    r = doctor(model, loader, None, steps=60, optimizer="adam", lr=3e-3, progress=False)
    assert r.meta["steps_run"] == 60 and r.meta["loss_fn"] == "the model's own loss"
    # every Linear and LayerNorm of the model gets its backward signal measured
    want = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))}
    assert want <= set(r.record.layer_names(metric="out_grad_norm"))
    _, acc = r.record.scalar("accuracy")  # logits [N, 3] vs labels [N]
    assert len(acc) > 0 and all(0 <= a <= 1 for a in acc)
    assert r.meta["trivial_loss"] == pytest.approx(h, abs=0.06)
    final = sum(r.losses[-10:]) / 10
    if learnable:
        assert final < h - 0.1  # truth: the label is a function of the first token
        assert "not_learning" not in r.kinds
    else:
        assert final > h - 0.1  # truth: labels independent of the input
        f = finding(r.findings, "not_learning")
        assert f.numbers["trivial_loss"] == pytest.approx(h, abs=0.06)
        assert f.severity == "warning"  # nothing else explains it
        rx = [p.remedy for p in f.prescriptions]
        assert "warmup" in rx[:3]  # post-LN: warm-up (pre_ln cannot be applied to HF code)
        assert "pre_ln" not in rx
    every = {p.remedy for f in r.findings for p in f.prescriptions}
    assert not every & WRONG_FOR_TRANSFORMERS, every


@pytest.mark.parametrize("learnable", [True, False])
def test_gpt2_dict_batches_through_doctor(learnable: bool) -> None:
    torch.manual_seed(0)
    loader, ids = _gpt2_loader(learnable)
    h = _entropy(ids, V)
    r = doctor(_gpt2(), loader, None, steps=50, optimizer="adam", lr=1e-2, progress=False)
    assert r.meta["trivial_loss"] == pytest.approx(h, abs=0.1)
    final = sum(r.losses[-10:]) / 10
    if learnable:
        assert final < 0.7 * h and "not_learning" not in r.kinds
    else:
        f = finding(r.findings, "not_learning")
        rx = [p.remedy for p in f.prescriptions]
        assert "pre_ln" not in rx and "adam" not in rx[:1]  # pre-LN already, Adam already
    every = {p.remedy for f in r.findings for p in f.prescriptions}
    assert not every & WRONG_FOR_TRANSFORMERS, every


def test_bert_trial_structural_remedies_not_applicable() -> None:
    torch.manual_seed(0)
    loader, labels = _bert_loader(learnable=True)
    t = trial(_bert, loader, None,
              remedies=["warmup", "residual", "batchnorm", "kaiming_init", "lsuv_init",
                        "clip_norm"],
              steps=25, seeds=1, optimizer="adam", lr=3e-3)
    assert t.meta["trivial_loss"] == pytest.approx(_entropy(labels, 3), abs=0.06)
    for name in ("residual", "batchnorm"):
        assert t[name].verdict == "not applicable" and t[name].error
        assert f"{name}: not applicable" in str(t)
    # inits run on any model: LSUV rescales on the dict batch itself (model(**batch))
    for name in ("baseline", "warmup", "kaiming_init", "lsuv_init", "clip_norm"):
        row = t[name]
        assert row.error is None and row.seeds == 1 and math.isfinite(row.loss_mean)
        assert row.verdict not in ("not applicable", "error")


class _Encoder(nn.Module):
    """A 12-layer nn.TransformerEncoder classifier, post-LN or pre-LN."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(input_ids)).mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_transformer_prescriptions_follow_norm_placement(norm_first: bool) -> None:
    """A 12-layer nn.TransformerEncoder that cannot learn (labels independent of the input,
    fresh every step). Post-LN: pre_ln first and warm-up, and the pre_ln trial really runs on it.
    Pre-LN: warm-up, never pre_ln (already there). Neither gets skips, batch norm or fewer
    layers."""
    stream = [(b["input_ids"], b["labels"]) for b in FreshBatches(30)]
    torch.manual_seed(0)
    r = doctor(_Encoder(norm_first), stream, nn.CrossEntropyLoss(), steps=30, optimizer="adam",
               lr=3e-3, progress=False)
    assert r.record.meta["norm_placement"] == ("pre" if norm_first else "post")
    f = finding(r.findings, "not_learning")
    rx = [p.remedy for p in f.prescriptions]
    assert not {p.remedy for g in r.findings for p in g.prescriptions} & WRONG_FOR_TRANSFORMERS
    if norm_first:
        assert "pre_ln" not in rx and "warmup" in rx[:2]
        return
    assert rx[0] == "pre_ln" and "warmup" in rx[:3] and "lower_lr" in rx[:4]
    assert "post-LN transformer" in f.evidence
    t = trial(lambda: _Encoder(False), stream, nn.functional.cross_entropy, remedies=["pre_ln"],
              steps=3, seeds=1, optimizer="adam", lr=3e-3, probe=False)
    assert t["pre_ln"].error is None and t["pre_ln"].seeds == 1


def test_doctor_trials_on_bert_nothing_beats_chance() -> None:
    """Labels independent of the inputs (fresh every batch): the prescribed trials all run on
    the HF model, and none can be "better" (the truth: no model beats a constant here)."""
    torch.manual_seed(0)
    r = doctor(_bert(), FreshBatches(), None, steps=30, optimizer="adam", lr=3e-3,
               progress=False, trial=True, trial_seeds=1, max_trials=4)
    assert "not_learning" in r.kinds and len(r.trials) == 5
    for row in r.trials:
        assert row["error"] is None and row["verdict"] not in ("not applicable", "error")
        assert not row["verdict"].startswith("better"), row
