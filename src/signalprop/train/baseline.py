"""The trivial baseline: the loss of the best constant prediction under the run's own loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from signalprop.train.batches import LossFn, StepOutput


def _class_dim(pred: torch.Tensor, y: torch.Tensor) -> int | None:
    """Where the class logits sit in ``pred`` for integer targets ``y`` (``None``: no match)."""
    if pred.dim() == y.dim() + 1:
        if pred.shape[:-1] == y.shape:
            return pred.dim() - 1
        if pred.shape[0] == y.shape[0] and pred.shape[2:] == y.shape[1:]:
            return 1
    return None


class TrivialBaseline:
    """The loss of the best *constant* prediction, estimated from the batches a run trains on.

    Classification (integer targets, a class dimension in the prediction): candidates are the
    log label frequencies (their cross-entropy is the entropy of the labels, the best constant)
    and uniform logits (ln C). Regression (floating targets): the target mean (its squared error
    is the target variance) and, for targets in [0, 1], its logit (binary cross-entropy). Each
    candidate is scored with the run's own loss (``loss_fn``; the model's internal loss is
    cross-entropy / squared error in Hugging Face's convention) on the first batches kept, and
    the lowest is the baseline. Label ``-100`` (Hugging Face's ignore index) and out-of-range
    labels are left out of the frequencies.
    """

    #: Batches kept to score the candidates on.
    KEEP = 4

    def __init__(self, loss_fn: LossFn | None) -> None:
        self.loss_fn = loss_fn
        self.kind: str | None = None
        self.n_classes = 0
        self.counts: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.n = 0
        self.kept: list[tuple[torch.Tensor, Any, Any]] = []  # (pred template, target, batch)
        self.reason: str | None = None

    def update(self, out: StepOutput, batch: Any) -> None:
        """Add one batch (cheap: a bincount or two sums)."""
        if self.reason is not None and self.kind is None:
            return
        pred, y = out.pred, out.target
        if not isinstance(pred, torch.Tensor) or not isinstance(y, torch.Tensor):
            self.reason = ("no prediction tensor and target tensor to compare" if out.pred is
                           not None or out.target is not None else
                           "step_fn: the loop sees only the loss")
            return
        pred, y = pred.detach(), y.detach()
        if self.kind is None:
            cd = _class_dim(pred, y) if not y.is_floating_point() else None
            if cd is not None:
                self.kind, self.n_classes = "classification", int(pred.shape[cd])
            elif y.is_floating_point() and pred.is_floating_point():
                self.kind = "regression"
            else:
                self.reason = (f"targets of dtype {y.dtype} and shape {tuple(y.shape)} do not "
                               f"match a prediction of shape {tuple(pred.shape)}")
                return
        # sums stay on the targets' device: no host sync per step
        if self.kind == "classification":
            v = y.reshape(-1).long()
            v = v[(v >= 0) & (v < self.n_classes)]
            if self.counts is None or self.counts.device != v.device:
                self.counts = torch.zeros(self.n_classes, dtype=torch.float64, device=v.device) \
                    if self.counts is None else self.counts.to(v.device)
            self.counts += torch.bincount(v, minlength=self.n_classes).double()
        else:
            yf = y.double()
            flat = yf.reshape(yf.shape[0], -1) if yf.dim() else yf.reshape(1, 1)
            if self.sum is None or self.sum.shape != flat.shape[1:]:
                if self.sum is not None:  # the per-output shape changed: pool everything
                    self.n *= self.sum.numel()
                    flat = flat.reshape(-1, 1)
                self.sum = torch.zeros(flat.shape[1:], dtype=torch.float64, device=flat.device) \
                    if self.sum is None else self.sum.sum().reshape(1)
                self.sumsq = torch.zeros_like(self.sum) if self.sumsq is None \
                    else self.sumsq.sum().reshape(1)
            self.sum += flat.sum(0).to(self.sum.device)
            assert self.sumsq is not None
            self.sumsq += flat.square().sum(0).to(self.sumsq.device)
            self.n += flat.shape[0]
        if len(self.kept) < self.KEEP:
            # only the prediction's shape and dtype matter: the candidates are constants
            self.kept.append((torch.empty_like(pred), y, batch))

    def _candidates(self, template: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        dev, dt = template.device, template.dtype
        if self.kind == "classification":
            assert self.counts is not None
            total = float(self.counts.sum())
            if total == 0:
                return []
            cd = _class_dim(template, y)
            if cd is None:
                return []
            logp = torch.log(self.counts / total).clamp_min(-1e4).to(dev, dt)
            shape = [1] * template.dim()
            shape[cd] = self.n_classes
            return [logp.reshape(shape).expand_as(template).contiguous(),
                    torch.zeros_like(template)]
        assert self.sum is not None and self.n > 0
        mean = (self.sum / self.n).to(dev, dt)
        if mean.numel() > 1 and template.shape[1:].numel() == mean.numel():
            c = mean.reshape((1, *template.shape[1:])).expand_as(template).contiguous()
        else:
            c = torch.full_like(template, float(mean.mean()))
        cands = [c]
        ymin, ymax = float(y.min()), float(y.max())
        if ymin >= 0 and ymax <= 1:
            p = c.clamp(1e-6, 1 - 1e-6)
            cands.append(torch.log(p) - torch.log1p(-p))
        return cands

    def _score(self, cand: torch.Tensor, y: torch.Tensor, batch: Any) -> float:
        if self.loss_fn is not None:
            target = batch if isinstance(batch, Mapping) and set(batch) != {"x", "y"} else y
            return float(self.loss_fn(cand, target))
        if self.kind == "classification":
            cd = _class_dim(cand, y)
            logits = cand.movedim(cd, -1).reshape(-1, self.n_classes) if cd is not None else cand
            return float(nn.functional.cross_entropy(logits.float(), y.reshape(-1).long(),
                                                     ignore_index=-100))
        return float(nn.functional.mse_loss(cand.float().reshape(y.shape) if cand.numel() ==
                                            y.numel() else cand.float(), y.float()))

    def value(self) -> float:
        """The baseline loss (NaN when it cannot be computed; :attr:`reason` then says why)."""
        if self.kind is None or not self.kept:
            self.reason = self.reason or "no batch seen"
            return math.nan
        scores = []
        with torch.no_grad():
            for template, y, batch in self.kept:
                best = math.inf
                for cand in self._candidates(template, y):
                    try:
                        v = self._score(cand, y, batch)
                    except Exception as e:  # the user's loss rejects a constant prediction
                        self.reason = f"{type(e).__name__} scoring a constant prediction: {e}"
                        continue
                    if math.isfinite(v):
                        best = min(best, v)
                if math.isfinite(best):
                    scores.append(best)
        if not scores:
            self.reason = self.reason or "no finite loss for a constant prediction"
            return math.nan
        self.reason = None
        return float(sum(scores) / len(scores))

    def describe(self) -> str:
        """One phrase saying what the baseline is."""
        if self.kind == "classification":
            return (f"best constant prediction over {self.n_classes} classes (entropy of the "
                    f"label frequencies; ln {self.n_classes} = {math.log(self.n_classes):.4g} "
                    "when balanced)")
        if self.kind == "regression":
            return "best constant prediction (the target mean: loss = target variance for MSE)"
        return f"unknown ({self.reason})"
