"""A probe in a plain PyTorch training loop: the three added lines are marked ``# <-``.

Trains a 12-layer tanh MLP on scikit-learn's digits (bundled, offline), records per-layer
statistics every 10 steps, prints the gradient norm of each weight across depth and the
diagnosis, and saves the record.

    python examples/plain_probe.py [--steps 300] [--out examples-out/plain_probe]
"""

from __future__ import annotations

import torch
from _common import mlp_layers, parser
from torch import nn

import signalprop


def main() -> None:
    args = parser(__doc__, 300, "examples-out/plain_probe").parse_args()
    torch.manual_seed(0)

    data = signalprop.load_dataset("digits")
    layers = mlp_layers(data.x_train.shape[1], 12, 64, nn.Tanh)
    model = nn.Sequential(*layers, nn.Linear(64, data.num_classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()

    probe = signalprop.Probe(model, optimizer=opt, schedule=signalprop.every(10))  # <-
    step = 0
    with probe:  # <- hooks attached here, removed on exit
        while step < args.steps:
            for x, y in data.loader(batch_size=64, seed=step):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                probe.log(loss=loss)  # <- optional: whole-model scalars
                opt.step()  # the optimiser's hooks close the probe's step
                step += 1
                if step >= args.steps:
                    break

    record = probe.record
    last = record.steps[-1]
    print(f"recorded steps: {record.steps[:5]} ... {last} ({len(record)} in all)")
    print(f"loss at step {last}: {record.get(last, signalprop.record.MODEL, 'loss'):.4f}")
    print("||dL/dW|| across depth at the last recorded step:")
    for name, g in record.at(last, "grad_norm").items():
        if name.endswith("weight"):
            print(f"  {name:12s} {g:.3e}")
    findings = signalprop.diagnose(record)
    print(f"diagnosis: {len(findings)} finding(s)" if findings else "diagnosis: healthy")
    for f in findings:
        print(f"  {f.kind} ({f.severity}): {f.evidence}")
    path = record.save(args.out / "record.json.gz")
    print(f"record: {path}  (signalprop.Record.load(path), record.to_dataframe())")


if __name__ == "__main__":
    main()
