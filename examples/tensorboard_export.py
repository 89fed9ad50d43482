"""Probe measurements in TensorBoard: live while training, or from a saved record.

Live: a :class:`~signalprop.integrations.tensorboard.TensorBoardWriter` is a probe listener, so
each recorded step is written as it happens. Afterwards: ``record.to_tensorboard(logdir)``.
Tags are ``signalprop/<metric>/<layer>`` (e.g. ``signalprop/grad_norm/3.weight``), plus
``signalprop/nonfinite_layers/<metric>`` (layers whose value was NaN/Inf at that step),
``signalprop/depth/log10_grad_norm`` (histogram across depth) and ``signalprop/out_dist/<layer>``
(each layer's output between its 5th and 95th percentiles).

    python examples/tensorboard_export.py [--steps 200] [--out examples-out/tensorboard]
    tensorboard --logdir examples-out/tensorboard
"""

from __future__ import annotations

import torch
from _common import parser
from torch import nn

import signalprop
from signalprop.integrations.tensorboard import TensorBoardWriter, load_scalars
from signalprop.train import fit


def main() -> None:
    args = parser(__doc__, 200, "examples-out/tensorboard").parse_args()
    torch.manual_seed(0)

    data = signalprop.load_dataset("digits")
    model = nn.Sequential(
        nn.Linear(data.x_train.shape[1], 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, data.num_classes),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    live_dir = args.out / "live"
    with TensorBoardWriter(live_dir) as tb:
        probe = signalprop.Probe(model, schedule=10, on_record=[tb])
        fit(model, data, nn.functional.cross_entropy, steps=args.steps, optimizer=opt,
            probe=probe)

    # the same record, written after the fact (e.g. a record loaded from disk)
    saved = probe.record.save(args.out / "record.json.gz")
    after_dir = signalprop.Record.load(saved).to_tensorboard(args.out / "from_record")

    # read back with TensorBoard's own reader
    scalars = load_scalars(live_dir)
    steps, loss = scalars["signalprop/loss"]
    print(f"{len(scalars)} scalar tags written live; loss at steps {steps.tolist()[:3]} ... "
          f"{steps[-1]}: {loss[0]:.3f} -> {loss[-1]:.3f}")
    print(f"non-finite layers over the run: "
          f"{int(scalars['signalprop/nonfinite_layers/grad_norm'][1].sum())}")
    print(f"tensorboard --logdir {args.out}   (runs: {live_dir.name}, {after_dir.name})")


if __name__ == "__main__":
    main()
