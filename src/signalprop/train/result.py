"""The one divergence policy and the one result type of the package's loops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from signalprop import stats
from signalprop.record import Record

#: A finite loss above ``DIVERGE_FACTOR x max(first loss, 1)`` counts as divergence.
DIVERGE_FACTOR: float = 100.0


# --- divergence ----------------------------------------------------------------------------------
def divergence_reason(
    loss: float, initial_loss: float | None, grads_finite: bool = True,
    diverge_factor: float | None = DIVERGE_FACTOR,
) -> str | None:
    """The one divergence policy: ``"nonfinite"`` for a non-finite loss or gradient,
    ``"loss_bound"`` for a loss above ``diverge_factor x max(initial_loss, 1)``, else ``None``."""
    if not math.isfinite(loss) or not grads_finite:
        return "nonfinite"
    if diverge_factor is not None and initial_loss is not None and math.isfinite(initial_loss) \
            and loss > diverge_factor * max(initial_loss, 1.0):
        return "loss_bound"
    return None


def _grads_finite(params: Sequence[torch.Tensor]) -> bool:
    # (sparse gradients, nn.Embedding(sparse=True): their stored values)
    grads = [stats.dense_values(p.grad) for p in params if p.grad is not None]
    if not grads:
        return True
    # the sum in float64 (float32 only where the device has no float64): a finite float64
    # gradient's norm may exceed float32's range (3.4e38) and must not read as non-finite
    dt = torch.float32 if grads[0].device.type == "mps" else torch.float64
    total = torch.stack([n.to(dt) for n in torch._foreach_norm(grads)]).sum()
    return bool(torch.isfinite(total))


# --- result ------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """What one training run produced (the one result type of the package's loops).

    Attributes:
        record: The probe's record (empty when not probed).
        losses: Loss at every optimiser step (the mean over an accumulation window; the last one
            may be NaN/Inf on divergence).
        diverged: Whether the run stopped by the divergence policy (:func:`divergence_reason`).
        diverged_step: The step at which it did.
        steps: Steps completed (including a diverging one).
        wall_time: Seconds of training (excluding model construction).
        model: The trained model (``None`` for a member of a batched population that was not
            exported as a module).
        extra: Anything else (e.g. ``skipped_steps`` of a GradScaler).
        diverged_reason: ``"nonfinite"``, ``"loss_bound"`` or ``None``.
        interrupted: Ctrl-C stopped the run; everything above covers the steps done.
        trivial_loss: The loss of the best constant prediction (:class:`TrivialBaseline`; NaN
            when unknown).
        trivial_kind: What that baseline is, in words.
    """

    record: Record
    losses: list[float]
    diverged: bool
    diverged_step: int | None
    steps: int
    wall_time: float
    model: nn.Module | None
    extra: dict[str, Any] = field(default_factory=dict)
    diverged_reason: str | None = None
    interrupted: bool = False
    trivial_loss: float = math.nan
    trivial_kind: str = ""

    @property
    def final_loss(self) -> float:
        """Mean of the last ``min(10, steps)`` losses (NaN when diverged)."""
        if self.diverged:
            return math.nan
        return stats.final_loss(self.losses)

    @property
    def initial_loss(self) -> float:
        """The first step's loss (NaN when no step ran)."""
        return self.losses[0] if self.losses else math.nan

    @property
    def grad_ratio(self) -> float:
        """:func:`signalprop.stats.grad_ratio` of the record."""
        return stats.grad_ratio(self.record)

    @property
    def beats_trivial(self) -> bool | None:
        """Whether the final loss is below the trivial baseline (``None`` when either is
        unknown); see :func:`signalprop.stats.beats_trivial`."""
        return stats.beats_trivial(self.final_loss, self.trivial_loss)


#: The name this type had before the loops were merged.
TrainResult = FitResult
