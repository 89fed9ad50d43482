"""MLflow from a plain PyTorch loop, into a local store: summary scalars per recorded step and
one depth-profile figure (log10 gradient norm vs layer, a line per step) as an artifact.

    python examples/mlflow_writer.py [--steps 60] [--out examples-out/mlflow]
    mlflow ui --backend-store-uri examples-out/mlflow/mlruns   # to look at it
"""

from __future__ import annotations

import os

import mlflow
import torch
from _common import parser
from torch import nn

import signalprop
from signalprop.integrations.mlflow import mlflow_writer
from signalprop.train import fit


def main() -> None:
    args = parser(__doc__, 60, "examples-out/mlflow").parse_args()
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
        probe = signalprop.Probe(model, schedule=5, on_record=[writer])
        fit(model, (x, y), nn.functional.cross_entropy, steps=args.steps, optimizer=opt,
            batch_size=len(x), probe=probe)  # full batch
        writer.flush()
    client = mlflow.tracking.MlflowClient()
    hist = client.get_metric_history(run.info.run_id, "signalprop/grad_ratio_first_last")
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "signalprop")]
    print(f"{len(hist)} values of signalprop/grad_ratio_first_last, last {hist[-1].value:.3g}")
    print("artifacts:", ", ".join(arts))


if __name__ == "__main__":
    main()
