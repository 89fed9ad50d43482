"""Ray Tune + ASHA stops the trials whose gradients vanish.

Four 20-layer MLPs that differ only in their activation train on the digits data; each reports
its probe summary to Ray Tune every recorded step. ASHA keeps the trials with the largest
log10(||dL/dW_first|| / ||dL/dW_last||) and stops the others at its rungs. The ReLU net (He init),
whose gradients reach the input, runs first and trains to the end; nets whose gradients vanish
(sigmoid: about 1e-16 at the input) fall below its score at the first rung and are stopped.

    python examples/ray_tune_asha.py [--steps 60] [--acts relu,tanh,sigmoid,hardsigmoid]
                                     [--out examples-out/ray_tune]
"""

from __future__ import annotations

import os

import torch
from _common import parser
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from torch import nn

import signalprop
from signalprop.integrations.ray_tune import tune_reporter
from signalprop.train import fit

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}
EVERY = 5  # record (and report) every EVERY optimiser steps


def trainable(config: dict) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = signalprop.load_dataset("digits")
    layers: list[nn.Module] = []
    d = data.x_train.shape[1]
    for _ in range(20):
        lin = nn.Linear(d, 64)
        if config["act"] == "relu":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        layers += [lin, ACTIVATIONS[config["act"]]()]
        d = 64
    model = nn.Sequential(*layers, nn.Linear(d, data.num_classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = signalprop.Probe(model, schedule=EVERY, on_record=[tune_reporter()], forward=False)
    fit(model, data, nn.functional.cross_entropy, steps=config["steps"], optimizer=opt,
        probe=probe)


def main() -> None:
    ap = parser(__doc__, 60, "examples-out/ray_tune", "optimiser steps per trial")
    ap.add_argument("--acts", default=",".join(ACTIVATIONS),
                    help="comma-separated activations, one trial each, run in this order")
    args = ap.parse_args()
    acts = args.acts.split(",")
    for a in acts:
        if a not in ACTIVATIONS:
            raise SystemExit(f"unknown activation {a!r}; valid choices: {', '.join(ACTIVATIONS)}")
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    reports = args.steps // EVERY
    tuner = tune.Tuner(
        trainable,
        param_space={"act": tune.grid_search(acts), "steps": args.steps},
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(metric="log10_grad_ratio", mode="max", max_t=reports,
                                    grace_period=2, reduction_factor=2),
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(storage_path=str(args.out.resolve()), name="asha",
                                  verbose=0),
    )
    results = tuner.fit()
    ray.shutdown()
    print(f"\n{'activation':12s} {'reports':>7s} {'log10 grad ratio':>17s}  status")
    for r in sorted(results, key=lambda r: -r.metrics["training_iteration"]):
        n = r.metrics["training_iteration"]
        status = "trained to the end" if n >= reports else "stopped by ASHA"
        print(f"{r.config['act']:12s} {n:7d} {r.metrics['log10_grad_ratio']:17.2f}  {status}")


if __name__ == "__main__":
    main()
