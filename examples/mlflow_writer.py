"""MLflow from a plain PyTorch loop, into a local store: summary scalars per recorded step and
one depth-profile figure (log10 gradient norm vs layer, a line per step) as an artifact.

    python examples/mlflow_writer.py [--steps 60] [--out examples-out/mlflow]
    mlflow ui --backend-store-uri examples-out/mlflow/mlruns   # to look at it
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mlflow
import torch
from torch import nn

import signalprop
from signalprop.integrations.mlflow import mlflow_writer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path("examples-out/mlflow"))
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store, no server
    mlflow.set_tracking_uri((args.out / "mlruns").resolve().as_uri())
    torch.manual_seed(0)
    data = signalprop.load_dataset("digits")
    d = data.x_train.shape[1]
    model = nn.Sequential(nn.Linear(d, 64), *[m for _ in range(8) for m in
                                               (nn.Linear(64, 64), nn.Sigmoid())],
                          nn.Linear(64, data.num_classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data.x_train, data.y_train
    with mlflow.start_run(run_name="deep-sigmoid") as run:
        writer = mlflow_writer(run, profile_every=5)
        with signalprop.Probe(model, optimizer=opt, schedule=5, on_record=[writer]) as probe:
            for _ in range(args.steps):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                probe.log(loss=loss)
                opt.step()
        writer.flush()
    client = mlflow.tracking.MlflowClient()
    hist = client.get_metric_history(run.info.run_id, "signalprop/grad_ratio_first_last")
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "signalprop")]
    print(f"{len(hist)} values of signalprop/grad_ratio_first_last, last {hist[-1].value:.3g}")
    print("artifacts:", ", ".join(arts))


if __name__ == "__main__":
    main()
