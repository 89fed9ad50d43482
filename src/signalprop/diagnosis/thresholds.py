"""Named, documented, overridable thresholds of the diagnosis rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from signalprop._registry import unknown_name_message


@dataclass(frozen=True)
class Thresholds:
    """Every number a diagnosis rule compares against. Override any of them::

        diagnose(record, Thresholds(vanishing_ratio=1e-3))
        diagnose(record, {"saturated_fraction": 0.3})

    Gradient ratios compare the backward signal ``||dL/dh||`` at the output of the *first* weight
    layer (Linear/Conv nearest the input) with that of the *last* one (nearest the loss), as a
    median over the recorded steps. A healthy He-initialised ReLU MLP or a BN-tanh MLP of depth 10
    keeps this ratio within about 3x of 1 (measured on digits); a 30-layer sigmoid MLP with
    PyTorch's default init has ~1e-20 (Schoenholz et al. 2017: the squared gradient norm scales by
    chi_1 per layer, here chi_1 ~ 1/48).

    Attributes:
        vanishing_ratio: first/last gradient ratio below which gradients *vanish* (two orders of
            magnitude: the first layer then learns >= 100x slower than the last under SGD).
        vanishing_critical_ratio: below this, the vanishing finding is critical.
        exploding_ratio: first/last gradient ratio above which gradients *explode*. Batch-normed
            nets explode mildly by design (Yang et al. 2019: ~1.47x per layer in the squared norm
            for ReLU); 100x leaves room for that at moderate depth.
        exploding_critical_ratio: above this, the exploding finding is critical.
        growth_ratio: the total gradient norm growing by this factor over training (max over
            steps / first recorded step) is also an exploding finding.
        saturated_fraction: an activation layer is *saturated* when the median (over the last
            ``tail_fraction`` of recorded steps) fraction of its units with
            ``|phi'(z)| < ratio * max|phi'|`` is at least this. The per-unit ``ratio`` is the
            probe's (``stats.SATURATION_DERIVATIVE_RATIO`` = 0.1: sigmoid |z| > 3.6, tanh
            |z| > 1.8). A BN-tanh net sits at ~7% (P(|z| > 1.82) for z ~ N(0, 1)).
        saturation_critical_fraction: mean saturated fraction over the flagged layers above which
            the finding is critical.
        dead_fraction: a rectifier layer is *dead* when the median fraction of units inactive for
            a whole batch is at least this.
        dead_critical_fraction: mean dead fraction over flagged layers above which it is critical.
        tail_fraction: saturation and dead units are judged on this last fraction of the recorded
            steps (they develop during training; a brief transient at step 0 is not a finding).
        update_ratio_high: a weight matrix whose median update ||dW|| / ||W|| per optimiser step
            is above this moves too fast (the usual rule of thumb is ~1e-3).
        update_ratio_low: one below this barely moves at all (reported only for layers that the
            vanishing-gradient finding does not already explain).
        divergence_loss_ratio: the loss rising to this multiple of its initial value (median of
            the first 3 recorded losses) is a divergence finding.
        adaptive_eps_floor: per-element RMS gradient below which Adam/RMSprop cannot help: their
            epsilon (1e-8) then dominates sqrt(v) and the step shrinks with the gradient again.
        min_layers: fewer weight layers than this and depth-wise gradient ratios are not judged.
        not_learning_margin: the loss must end at least this fraction below the trivial
            baseline (the loss of the best constant prediction, computed from the data by
            ``signalprop.train.TrivialBaseline``) or the run is ``not_learning``; the same margin
            decides whether a trial beats the baseline (``signalprop.stats.TRIVIAL_MARGIN``).
    """

    vanishing_ratio: float = 1e-2
    vanishing_critical_ratio: float = 1e-6
    exploding_ratio: float = 1e2
    exploding_critical_ratio: float = 1e6
    growth_ratio: float = 1e3
    saturated_fraction: float = 0.4
    saturation_critical_fraction: float = 0.8
    dead_fraction: float = 0.4
    dead_critical_fraction: float = 0.8
    tail_fraction: float = 0.5
    update_ratio_high: float = 0.1
    update_ratio_low: float = 1e-6
    divergence_loss_ratio: float = 10.0
    adaptive_eps_floor: float = 1e-7
    min_layers: int = 2
    not_learning_margin: float = 0.02

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"threshold {f.name} must be a positive number, got {v!r}")
        if not self.tail_fraction <= 1:
            raise ValueError(f"tail_fraction must be in (0, 1], got {self.tail_fraction}")
        if not self.vanishing_critical_ratio <= self.vanishing_ratio < 1:
            raise ValueError("need vanishing_critical_ratio <= vanishing_ratio < 1")
        if not 1 < self.exploding_ratio <= self.exploding_critical_ratio:
            raise ValueError("need 1 < exploding_ratio <= exploding_critical_ratio")

    @classmethod
    def coerce(cls, value: Thresholds | Mapping[str, Any] | None) -> Thresholds:
        """``None`` -> defaults; a mapping -> defaults with those fields overridden."""
        if value is None:
            return cls()
        if isinstance(value, Thresholds):
            return value
        if isinstance(value, Mapping):
            names = [f.name for f in dataclasses.fields(cls)]
            for k in value:
                if k not in names:
                    raise ValueError(unknown_name_message("threshold", k, names))
            return cls(**dict(value))
        raise TypeError(
            f"thresholds must be a Thresholds, a mapping or None, got {type(value).__name__}"
        )

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)
