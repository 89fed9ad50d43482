"""Weights & Biases: a probe ``on_record`` listener that logs the summary scalars of each
recorded step and ONE depth-profile chart per metric (log10 of the metric vs layer, a line per
step), instead of one chart per layer.

    import wandb
    from signalprop.integrations.wandb import wandb_writer

    run = wandb.init(project="my-project")
    writer = wandb_writer(run)
    with signalprop.Probe(model, optimizer=opt, schedule=10, on_record=[writer]):
        ...  # the unchanged training loop
    writer.flush()  # the final depth chart
    run.finish()

Needs the ``[wandb]`` extra. Keys (``prefix`` defaults to ``"signalprop"``):
``<prefix>/<summary key>`` (:data:`signalprop.integrations.common.SUMMARY_KEYS`, plus ``loss``
and ``grad_norm_total``), plotted against ``<prefix>/step`` (the probe's step, declared with
``define_metric`` so your own ``wandb.log`` steps are untouched), and ``<prefix>/depth/<metric>``
(a line-series chart).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from signalprop._optional import require
from signalprop.integrations._profile import ProfileWriter
from signalprop.integrations.common import StepValues, summary_metrics


def _wandb() -> Any:
    return require("wandb", "wandb", "the W&B writer")


class WandbWriter(ProfileWriter):
    """Probe listener ``f(step, values)`` logging to a W&B run (see the module docstring).

    Args:
        run: A ``wandb`` run (``wandb.init(...)``); default: the active ``wandb.run``.
        prefix: First component of every key.
        profile_metrics: Per-layer metrics drawn as depth profiles.
        max_lines: Steps (lines) per depth chart, log-spaced.
        profile_every: Re-draw the depth charts every this many recorded steps (each draw logs
            a small table); :meth:`flush` draws the last one.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        prefix: str = "signalprop",
        profile_metrics: Iterable[str] = ("grad_norm", "out_grad_norm"),
        max_lines: int = 6,
        profile_every: int = 1,
    ) -> None:
        wandb = _wandb()
        self.run = run if run is not None else wandb.run
        if self.run is None:
            raise ValueError("wandb_writer needs a run: call wandb.init(...) first or pass run=")
        super().__init__(prefix, profile_metrics, max_lines, profile_every)
        self.run.define_metric(f"{prefix}/step")
        self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")

    def __call__(self, step: int, values: StepValues) -> None:
        data: dict[str, Any] = {f"{self.prefix}/step": int(step)}
        data.update(summary_metrics(values, prefix=f"{self.prefix}/"))
        if self._add_profiles(step, values):
            data.update(self._charts())
        self.run.log(data)

    def _charts(self) -> dict[str, Any]:
        wandb = _wandb()
        out = {}
        for prof in self.profiles:
            if not prof.steps:
                continue
            steps, ys = prof.log10_lines()
            out[f"{self.prefix}/depth/{prof.metric}"] = wandb.plot.line_series(
                xs=list(range(len(prof.layers))),
                ys=ys,
                keys=[f"step {s}" for s in steps],
                title=f"log10 {prof.metric} vs depth (input -> output)",
                xname="layer index",
            )
        self._dirty = False
        return out

    def flush(self) -> None:
        """Draw the depth charts with every step so far (call once after training)."""
        if self._dirty:
            self.run.log(self._charts())


def wandb_writer(run: Any = None, **kwargs: Any) -> WandbWriter:
    """A :class:`WandbWriter` for ``Probe(..., on_record=[wandb_writer(run)])``."""
    return WandbWriter(run, **kwargs)
