"""Integrations with the tools people already train with.

Each sub-module imports its optional dependency only when it is imported itself, so
``import signalprop`` never needs them:

- :mod:`signalprop.integrations.tensorboard` (extra ``[tensorboard]``): write a
  :class:`~signalprop.record.Record` as TensorBoard scalars and histograms, or stream a probe's
  measurements live (:class:`~signalprop.integrations.tensorboard.TensorBoardWriter`).
- :mod:`signalprop.integrations.lightning` (extra ``[lightning]``):
  :class:`~signalprop.integrations.lightning.SignalpropCallback` records probes during
  ``Trainer.fit``, logs per-layer statistics through the trainer's logger, puts summary scalars
  into ``trainer.callback_metrics`` and warns once per diagnosis finding (``pytorch_lightning``
  and the unified ``lightning`` package alike).
- :mod:`signalprop.integrations.transformers` (extra ``[transformers]``): the Hugging Face
  ``Trainer`` callback: gradient norms before clipping, summary scalars through the Trainer's
  logs (every ``report_to`` backend), record and report at the end.
- :mod:`signalprop.integrations.wandb`, :mod:`signalprop.integrations.mlflow` (extras
  ``[wandb]``, ``[mlflow]``): probe listeners logging summary scalars and one depth-profile
  chart per metric.
- :mod:`signalprop.integrations.distributed`: DDP/FSDP: per-layer values combined across ranks
  before they are recorded; records written by rank 0.
- :mod:`signalprop.integrations.ray_tune` (extra ``[ray]``): report probe summaries to Ray Tune
  so a scheduler can stop trials whose gradients vanish.
- :mod:`signalprop.integrations.common`: what they share (summary scalars, depth profile,
  warning once per finding, the doctor's report of any record).

In a plain PyTorch loop no integration is needed; three lines do it::

    probe = signalprop.Probe(model, optimizer=opt, schedule=signalprop.every(10))
    with probe:
        ...  # the unchanged training loop
    print(signalprop.diagnose(probe.record))
"""

from __future__ import annotations

__all__ = [
    "common", "distributed", "lightning", "mlflow", "ray_tune", "tensorboard", "transformers",
    "wandb",
]
