"""signalprop inside the Hugging Face Trainer: one callback.

A tiny BERT built from a config (nothing is downloaded) learns a toy sequence task with gradient
accumulation and clipping on. ``SignalpropCallback`` records the gradient norms *before* the
Trainer clips them (and the Trainer's own pre-clip ``grad_norm`` beside them), adds summary
scalars to the Trainer's logs (every ``report_to`` backend receives them; TensorBoard here),
warns once per diagnosis finding and writes record.json.gz, findings.json and report.html.

    python examples/hf_trainer.py [--steps 20] [--out examples-out/hf]
"""

from __future__ import annotations

import torch
from _common import parser
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from signalprop.integrations.transformers import SignalpropCallback
from signalprop.record import MODEL


def toy_data(n: int = 256, seq: int = 16, vocab: int = 100) -> list[dict]:
    """Label: is token 7 in the sequence?"""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    labels = (ids == 7).any(dim=1).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": labels[i]} for i in range(n)]


def main() -> None:
    args = parser(__doc__, 20, "examples-out/hf", "optimiser steps").parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg)
    callback = SignalpropCallback(every=2, diagnose_every=10)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=8,
            gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=5e-4,
            logging_steps=1, save_strategy="no", report_to=["tensorboard"], use_cpu=True,
            disable_tqdm=True, seed=0,
        ),
        train_dataset=toy_data(),
        callbacks=[callback],
    )
    trainer.train()

    rec = callback.record
    s = rec.steps[-1]
    print(f"\nrecorded {len(rec)} of {trainer.state.global_step} optimiser steps")
    print(f"step {s}: loss {rec.get(s, MODEL, 'loss'):.3f}; global grad norm before clipping "
          f"{rec.get(s, MODEL, 'grad_norm_total'):.4g} (Trainer's own: "
          f"{rec.get(s, MODEL, 'trainer_grad_norm'):.4g}), after "
          f"{rec.get(s, MODEL, 'grad_norm_total_clipped'):.4g}")
    print("findings:", ", ".join(f.kind for f in callback.findings) or "none")
    print("files:", ", ".join(str(p) for p in callback.written.values()))


if __name__ == "__main__":
    main()
