"""MLflow: a probe ``on_record`` listener that logs the summary scalars of each recorded step as
MLflow metrics (with the probe's step) and ONE depth-profile figure per metric (log10 of the
metric vs layer, a line per step) plus the numbers behind it as a JSON artifact.

    import mlflow
    from signalprop.integrations.mlflow import mlflow_writer

    with mlflow.start_run() as run:
        writer = mlflow_writer(run)
        with signalprop.Probe(model, optimizer=opt, schedule=10, on_record=[writer]):
            ...  # the unchanged training loop
        writer.flush()  # the final depth figure

Needs the ``[mlflow]`` extra. Metric keys: ``<prefix>/<summary key>``; artifacts:
``<prefix>/depth_<metric>.png`` and ``<prefix>/depth_<metric>.json``
(``{"layers": [...], "steps": {step: [values]}}``, every recorded step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from signalprop._optional import require
from signalprop.integrations._profile import ProfileHistory, ProfileWriter, short_labels
from signalprop.integrations.common import StepValues, summary_metrics
from signalprop.report.figures import new_figure


def _mlflow() -> Any:
    return require("mlflow", "mlflow", "the MLflow writer")


class MlflowWriter(ProfileWriter):
    """Probe listener ``f(step, values)`` logging to an MLflow run (see the module docstring).

    Args:
        run: An ``mlflow.ActiveRun``/``Run`` or a run id; default: the active run.
        tracking_uri: Tracking URI of that run (default: MLflow's current one).
        prefix: First component of every key.
        profile_metrics: Per-layer metrics drawn as depth profiles.
        max_lines: Steps (lines) per depth figure, log-spaced.
        profile_every: Re-draw the figures every this many recorded steps (:meth:`flush` draws
            the last one); drawing costs about 0.1 s.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        tracking_uri: str | None = None,
        prefix: str = "signalprop",
        profile_metrics: Iterable[str] = ("grad_norm", "out_grad_norm"),
        max_lines: int = 6,
        profile_every: int = 10,
    ) -> None:
        mlflow = _mlflow()
        if run is None:
            run = mlflow.active_run()
            if run is None:
                raise ValueError("mlflow_writer needs a run: use mlflow.start_run() or pass run=")
        self.run_id = run if isinstance(run, str) else run.info.run_id
        super().__init__(prefix, profile_metrics, max_lines, profile_every)
        self.client = mlflow.tracking.MlflowClient(tracking_uri)

    def __call__(self, step: int, values: StepValues) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), ts, int(step))
            for k, v in summary_metrics(values, prefix=f"{self.prefix}/").items()
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        if self._add_profiles(step, values):
            self.flush()

    def flush(self) -> None:
        """Write the depth figures and their JSON with every step so far."""
        if not self._dirty:
            return
        for prof in self.profiles:
            if not prof.steps:
                continue
            data = {
                "metric": prof.metric,
                "layers": prof.layers,
                "steps": {str(s): [v if math.isfinite(v) else None for v in vs]
                          for s, vs in prof.steps.items()},
            }
            self.client.log_dict(self.run_id, data, f"{self.prefix}/depth_{prof.metric}.json")
            fig = _figure(prof)
            self.client.log_figure(self.run_id, fig, f"{self.prefix}/depth_{prof.metric}.png")
        self._dirty = False


def _figure(prof: ProfileHistory) -> Any:
    fig, axes = new_figure(6.0, 3.4)
    ax = axes[0, 0]
    steps, ys = prof.log10_lines()
    x = list(range(len(prof.layers)))
    for s, y in zip(steps, ys, strict=True):
        ax.plot(x, [math.nan if v is None else v for v in y], "-o", ms=2.5, lw=1.2,
                label=f"step {s}")
    ax.set_xlabel("layer (input -> output)")
    ax.set_ylabel(f"log10 {prof.metric}")
    ax.set_title(f"{prof.metric} vs depth", fontsize=10)
    if len(x) <= 16:
        ax.set_xticks(x, short_labels(prof.layers), rotation=60, fontsize=6, ha="right")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def mlflow_writer(run: Any = None, **kwargs: Any) -> MlflowWriter:
    """A :class:`MlflowWriter` for ``Probe(..., on_record=[mlflow_writer(run)])``."""
    return MlflowWriter(run, **kwargs)
