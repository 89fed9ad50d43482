"""Integrations with the tools people already train with.

Each sub-module imports its optional dependency only when it is imported itself, so
``import signalprop`` never needs them:

- :mod:`signalprop.integrations.tensorboard` (extra ``[tensorboard]``): write a
  :class:`~signalprop.record.Record` as TensorBoard scalars and histograms, or stream a probe's
  measurements live (:class:`~signalprop.integrations.tensorboard.TensorBoardWriter`).
- :mod:`signalprop.integrations.lightning` (extra ``[lightning]``):
  :class:`~signalprop.integrations.lightning.SignalpropCallback` records probes during
  ``Trainer.fit``, logs per-layer statistics through the trainer's logger, and warns once per
  diagnosis finding.

In a plain PyTorch loop no integration is needed; three lines do it::

    probe = signalprop.Probe(model, optimizer=opt, schedule=signalprop.every(10))
    with probe:
        ...  # the unchanged training loop
    print(signalprop.diagnose(probe.record))
"""

from __future__ import annotations

__all__ = ["lightning", "tensorboard"]
