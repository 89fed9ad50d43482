"""W&B and MLflow writers, run for real offline (W&B offline mode, MLflow file store)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from signalprop.integrations.common import depth_profile, summary_metrics
from signalprop.probe import Probe
from signalprop.record import MODEL

from ..helpers import train_probed


def _train(on_record: list, steps: int = 6, seed: int = 0) -> Probe:
    torch.manual_seed(seed)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(8, 8), nn.Tanh())],
                          nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    return train_probed(model, Probe(model, optimizer=opt, on_record=on_record), opt,
                        [(x, y)] * steps)


def test_summary_metrics_match_the_record() -> None:
    probe = _train([], steps=2)
    rec = probe.record
    s = rec.steps[-1]
    out = summary_metrics(rec.data[s])
    grads = [rec.get(s, n, "grad_norm") for n in ("0.weight", "2.weight", "4.weight",
                                                     "6.weight", "8.weight")]
    assert out["signalprop/grad_norm_first"] == grads[0]
    assert out["signalprop/grad_norm_last"] == grads[-1]
    assert out["signalprop/grad_ratio_first_last"] == pytest.approx(grads[0] / grads[-1])
    assert out["signalprop/grad_decades"] == pytest.approx(
        math.log10(max(grads) / min(grads)))
    assert out["signalprop/loss"] == rec.get(s, MODEL, "loss")
    assert out["signalprop/nonfinite"] == 0
    layers, vals = depth_profile(rec.data[s])
    assert layers == ["0.weight", "2.weight", "4.weight", "6.weight", "8.weight"]
    assert vals == grads


def test_wandb_writer_offline(tmp_path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    from signalprop.integrations.wandb import wandb_writer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="signalprop-test", dir=str(tmp_path), mode="offline")
    try:
        writer = wandb_writer(run, profile_every=100)
        probe = _train([writer], steps=5)
        writer.flush()
        rec = probe.record
        last = rec.steps[-1]
        # the summary holds the last logged value of every scalar key
        assert run.summary["signalprop/step"] == last
        assert run.summary["signalprop/grad_norm_total"] == pytest.approx(
            rec.get(last, MODEL, "grad_norm_total"))
        run_dir = run.dir
    finally:
        run.finish()
    # one depth chart per metric, a line per (log-spaced) step: its table is on disk
    tables = list((tmp_path / "wandb").rglob("*grad_norm*.table.json"))
    assert tables, list((tmp_path / "wandb").rglob("*"))
    gn = [t for t in tables if "out_grad_norm" not in t.name]
    table = json.loads(gn[-1].read_text())
    lines = {}
    for x, key, yv in (row for row in table["data"]):
        lines.setdefault(key, {})[x] = yv
    assert set(lines) == {f"step {s}" for s in rec.steps}
    layers, vals = depth_profile(rec.data[last])
    assert [lines[f"step {last}"][i] for i in range(len(layers))] == pytest.approx(
        [math.log10(v) for v in vals])
    assert len(gn) == 1  # profile_every=100: drawn once, by flush()
    assert (tmp_path / "wandb").as_posix() in run_dir


def test_mlflow_writer_file_store(tmp_path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    # MLflow 3 keeps the file store behind an opt-in; it is the store that needs no server
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from signalprop.integrations.mlflow import mlflow_writer

    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as run:
            writer = mlflow_writer(run, tracking_uri=uri, profile_every=3)
            probe = _train([writer], steps=5)
            writer.flush()
    finally:
        mlflow.set_tracking_uri(None)
    client = mlflow.tracking.MlflowClient(uri)
    rid = run.info.run_id
    rec = probe.record
    hist = client.get_metric_history(rid, "signalprop/grad_ratio_first_last")
    assert [h.step for h in hist] == rec.steps
    want = [summary_metrics(rec.data[s])["signalprop/grad_ratio_first_last"] for s in rec.steps]
    assert [h.value for h in hist] == pytest.approx(want)
    arts = {a.path for a in client.list_artifacts(rid, "signalprop")}
    assert {"signalprop/depth_grad_norm.png", "signalprop/depth_grad_norm.json"} <= arts
    path = client.download_artifacts(rid, "signalprop/depth_grad_norm.json", str(tmp_path))
    data = json.loads(open(path).read())
    layers, vals = depth_profile(rec.data[rec.steps[-1]])
    assert data["layers"] == layers
    assert data["steps"][str(rec.steps[-1])] == pytest.approx(vals)


def test_writers_need_a_run() -> None:
    pytest.importorskip("mlflow")
    from signalprop.integrations.mlflow import mlflow_writer

    with pytest.raises(ValueError, match="needs a run"):
        mlflow_writer()


def test_tune_reporter_reports_the_summary() -> None:
    from signalprop.integrations.ray_tune import tune_reporter

    got: list[dict] = []
    probe = _train([tune_reporter(got.append)], steps=3)
    rec = probe.record
    assert [g["step"] for g in got] == rec.steps
    for g, s in zip(got, rec.steps, strict=True):
        ratio = summary_metrics(rec.data[s], prefix="")["grad_ratio_first_last"]
        assert g["log10_grad_ratio"] == pytest.approx(math.log10(ratio))
        assert g["loss"] == rec.get(s, MODEL, "loss")
