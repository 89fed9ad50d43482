"""The batched training loop of a population (:meth:`Population.fit`), its result, the
per-member mini-batch order, the final evaluation and the export of one record per member."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from signalprop import stats
from signalprop.data import Dataset
from signalprop.record import Record

#: The divergence reasons by the code :func:`divergence_codes` gives them.
REASONS: tuple[str | None, ...] = (None, "nonfinite", "loss_bound")
#: ``Population.fit``'s default ``diverge_factor``: the policy's ``DIVERGE_FACTOR``.
POLICY_DEFAULT: Any = object()


def divergence_policy() -> Any:
    """The module of the package's one divergence policy, :mod:`signalprop.train.result`."""
    # lazy: importing signalprop.train loads the probe (+0.35 s measured: scipy.linalg,
    # torch._decomp), which a process that only runs populations never needs
    from signalprop.train import result

    return result


def divergence_codes(loss: torch.Tensor, initial_loss: torch.Tensor, grad_total: torch.Tensor,
                     diverge_factor: float | None) -> torch.Tensor:
    """:func:`signalprop.train.divergence_reason` for all members at once, on the device.

    Args:
        loss: Each member's loss at this step [K]. initial_loss: Each member's first loss [K].
        grad_total: Any per-member sum of gradient norms [K] (non-finite iff a gradient is).
        diverge_factor: The loss bound's factor (``None``: non-finite values only).

    Returns:
        int8 [K]: the index in :data:`REASONS` of each member's reason (0: not diverged).
    """
    nonfinite = ~(torch.isfinite(loss) & torch.isfinite(grad_total))
    code = nonfinite.to(torch.int8)
    if diverge_factor is not None:
        # in float64, as the scalar policy compares Python floats
        l0 = initial_loss.double()
        over = torch.isfinite(l0) & (loss.double() > diverge_factor * l0.clamp_min(1.0))
        code += 2 * (over & ~nonfinite).to(torch.int8)
    return code


@dataclass
class FitResult:
    """What :meth:`Population.fit` returns.

    Attributes:
        records: One :class:`Record` per member.
        losses: Mini-batch loss of every step and member, [steps, K] (NaN after divergence).
        diverged_step: Per member, the step the divergence policy stopped it at, or None.
        final: Per member, a dict of final metrics (see :meth:`Population.fit`).
        wall_time: Seconds spent training (excluding the final evaluation).
        eval_time: Seconds of the final evaluation.
    """

    records: list[Record]
    losses: np.ndarray
    diverged_step: list[int | None]
    final: list[dict[str, Any]]
    wall_time: float
    eval_time: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    #: Per member, ``"nonfinite"``, ``"loss_bound"`` or None (:func:`signalprop.train.divergence_reason`).
    diverged_reason: list[str | None] = field(default_factory=list)

    def member(self, k: int, model: Any = None) -> Any:
        """Member ``k`` as the package's one run result, :class:`signalprop.train.FitResult`
        (its losses up to divergence, its record; ``model`` e.g. from
        :meth:`Population.member_module`); the batched loop applies the same divergence policy,
        :func:`signalprop.train.divergence_reason`."""
        RunResult = divergence_policy().FitResult

        d = self.diverged_step[k]
        col = self.losses[:, k]
        n = d + 1 if d is not None else int(np.isfinite(col).sum())
        return RunResult(
            record=self.records[k], losses=[float(v) for v in col[:n]], diverged=d is not None,
            diverged_step=d, steps=n, wall_time=self.wall_time, model=model,
            extra=dict(self.final[k]),
            diverged_reason=self.diverged_reason[k] if self.diverged_reason
            else ("nonfinite" if d is not None else None),
            trivial_kind="not computed by the batched engine")


class BatchSampler:
    """Per-member mini-batch order: each epoch a fresh permutation of the training set drawn from
    the member's own generator (seeded ``2*seed+1``); the last incomplete batch is dropped.

    :func:`member_batches` yields the same indices for one member (the single-model reference).
    """

    def __init__(self, seeds: Sequence[int], n: int, batch_size: int, device: torch.device):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the data set ({n})")
        self.gens = [torch.Generator().manual_seed(2 * int(s) + 1) for s in seeds]
        self.n, self.b, self.device = n, batch_size, device
        self.per_epoch = n // batch_size
        self._epoch: torch.Tensor | None = None
        self._i = self.per_epoch

    def next(self) -> torch.Tensor:
        """Indices [K, B] of the next mini-batch of every member."""
        if self._i >= self.per_epoch:
            perms = torch.stack([torch.randperm(self.n, generator=g) for g in self.gens])
            self._epoch = perms[:, : self.per_epoch * self.b].view(
                len(self.gens), self.per_epoch, self.b
            ).to(self.device)
            self._i = 0
        assert self._epoch is not None
        idx = self._epoch[:, self._i]
        self._i += 1
        return idx


def _probe_schedule(steps: int, record_every: int, wanted: set[int] | None
                    ) -> Callable[[int], bool]:
    """Whether step t is probed: the first and last, and ``wanted`` or every ``record_every``."""
    def probe_at(t: int) -> bool:
        return t == 0 or t == steps - 1 or (
            t in wanted if wanted is not None else (record_every > 0 and t % record_every == 0))
    return probe_at


def member_batches(seed: int, n: int, batch_size: int, steps: int) -> list[torch.Tensor]:
    """The mini-batch indices (each [B]) that the engine feeds the member with this seed."""
    s = BatchSampler([seed], n, batch_size, torch.device("cpu"))
    return [s.next()[0] for _ in range(steps)]


class _Fitting:
    """Part of :class:`~signalprop.engine.population.Population`: ``evaluate``, ``fit`` and the
    records."""

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy [K] of every member on the same data (evaluation mode: batch norm
        uses its running statistics). Accuracy is NaN for regression."""
        x = x.to(self.device, self.dtype)
        y = y.to(self.device)
        tot_loss = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        correct = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        n = x.shape[0]
        for s in range(0, n, chunk):
            xb, yb = x[s : s + chunk], y[s : s + chunk]
            out = self._forward(xb.expand(self.K, *xb.shape), train=False).out
            yk = yb.expand(self.K, *yb.shape)
            if self.arch.task == "regression":
                yk = yk.to(self.dtype)
            loss, _ = self._loss(out, yk)
            tot_loss += loss.double() * xb.shape[0]
            if self.arch.task == "classification":
                correct += (out.argmax(-1) == yk).double().sum(1)
        acc = correct / n if self.arch.task == "classification" else torch.full_like(correct, math.nan)
        return (tot_loss / n).cpu(), acc.cpu()

    # long: 9 documented arguments and the result's keys take 40 of its lines; the body is ~25
    def fit(
        self,
        data: Dataset,
        steps: int,
        batch_size: int,
        seeds: Sequence[int],
        record_every: int = 10,
        callback: Callable[[int], None] | None = None,
        evaluate: bool = True,
        record_steps: Sequence[int] | None = None,
        diverge_factor: float | None = POLICY_DEFAULT,
    ) -> FitResult:
        """Train all members for ``steps`` steps; members that diverge are frozen.

        Divergence is :func:`signalprop.train.fit`'s policy, per member: a non-finite loss or
        gradient, or a loss above ``diverge_factor x max(L0, 1)``, L0 the member's loss at this
        call's first step. The diverging step's loss (and probes, when recorded) are kept; its
        update is not made.

        Args:
            data: The data set (moved to the population's device).
            steps: Optimiser steps. batch_size: Mini-batch size.
            seeds: Per-member data-order seeds (see :class:`BatchSampler`).
            record_every: Probe every n steps, plus the first and last (0: those two only).
            callback: Called with the number of steps done, every ~1% of the run.
            evaluate: Compute loss/accuracy on the whole train and test splits at the end.
            record_steps: Probe exactly these steps (plus the first and last) instead of every
                ``record_every`` (e.g. log-spaced steps for a long run).
            diverge_factor: The loss bound (default ``DIVERGE_FACTOR``; ``None``: non-finite
                values only).

        Returns:
            :class:`FitResult`; ``final[k]`` has ``final_loss`` (mean mini-batch loss of the last
            min(10, steps) steps; NaN if diverged), ``min_loss``, ``train_loss``, ``test_loss``,
            ``train_accuracy``, ``test_accuracy``, ``diverged_step``, ``diverged_reason``,
            ``grad_ratio_init`` and ``grad_ratio_final`` (:func:`signalprop.stats.grad_ratio` of
            the member's record at its first and last recorded steps).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if record_every < 0:
            raise ValueError(f"record_every must be >= 0, got {record_every}")
        wanted = None if record_steps is None else {int(s) for s in record_steps}
        if diverge_factor is not POLICY_DEFAULT:
            self.diverge_factor = diverge_factor
        self.initial_loss = None  # L0 is this call's first loss, as for a fresh fit()
        xtr = data.x_train.to(self.device, self.dtype)
        ytr = data.y_train.to(self.device)
        if self.arch.task == "regression":
            ytr = ytr.to(self.dtype)
        sampler = BatchSampler(seeds, xtr.shape[0], batch_size, self.device)
        t0 = time.perf_counter()
        losses, probed = self._train(xtr, ytr, sampler, steps,
                                     _probe_schedule(steps, record_every, wanted), callback)
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        trl, tel, tra, tea = self._evaluate_splits(data, evaluate)
        eval_time = time.perf_counter() - t1
        L = losses.cpu().double().numpy()
        records = self._records(*probed)
        final = [self._final(k, L, steps, records[k], (trl[k], tel[k], tra[k], tea[k]))
                 for k in range(self.K)]
        return FitResult(records, L, list(self.diverged_step), final, wall, eval_time,
                         diverged_reason=list(self.diverged_reason))

    def _evaluate_splits(self, data: Dataset, evaluate: bool) -> tuple[torch.Tensor, ...]:
        """Train loss, test loss, train accuracy, test accuracy [K] (NaN when not evaluated)."""
        if not evaluate:
            return (torch.full((self.K,), math.nan, dtype=torch.float64),) * 4
        trl, tra = self.evaluate(data.x_train, data.y_train)
        tel, tea = self.evaluate(data.x_test, data.y_test)
        return trl, tel, tra, tea

    def _apply_divergence_policy(self, loss: torch.Tensor, grad_norms: torch.Tensor) -> bool:
        """Freeze the active members that this step's loss [K] and gradient norms
        [n_params, K] make diverge (:func:`divergence_codes`); whether any member is frozen."""
        if self.initial_loss is None:
            self.initial_loss = loss.detach().clone()
        code = divergence_codes(loss, self.initial_loss, grad_norms.sum(0), self.diverge_factor)
        newly = self.active & (code > 0)
        if bool(newly.any()):  # the step's one host sync (a device-side any otherwise)
            ks = newly.nonzero().flatten()
            for k, c in zip(ks.tolist(), code[ks].tolist(), strict=True):
                self.diverged_step[k] = self.step_count
                self.diverged_reason[k] = REASONS[c]
            self.active &= ~newly
        return any(d is not None for d in self.diverged_step)

    def _train(self, xtr: torch.Tensor, ytr: torch.Tensor, sampler: BatchSampler, steps: int,
               probe_at: Callable[[int], bool], callback: Callable[[int], None] | None
               ) -> tuple[torch.Tensor, tuple[list[Any], ...]]:
        """The training steps: losses [steps, K] (NaN once a member is frozen) and the probed
        steps, their keys, values and active members (the arguments of :meth:`_records`)."""
        losses = torch.full((steps, self.K), math.nan, dtype=self.dtype, device=self.device)
        rec_steps: list[int] = []
        rec_keys: list[list[tuple[str, str]]] = []
        rec_vals: list[np.ndarray] = []
        rec_active: list[np.ndarray] = []
        every = max(1, steps // 100)
        for t in range(steps):
            idx = sampler.next()
            was_active = self.active.clone()
            loss, pr = self.train_step(xtr[idx], ytr[idx], probe=probe_at(t))
            losses[t] = torch.where(was_active, loss, torch.full_like(loss, math.nan))
            if pr is not None:
                keys = list(pr)
                vals = torch.stack([v.to(torch.float64) for v in pr.values()]).cpu().numpy()
                rec_steps.append(t)
                rec_keys.append(keys)
                rec_vals.append(vals)
                rec_active.append(was_active.cpu().numpy())
            if callback is not None and ((t + 1) % every == 0 or t == steps - 1):
                callback(t + 1)
            if not bool(self.active.any()):
                if callback is not None:
                    callback(steps)
                break
        return losses, (rec_steps, rec_keys, rec_vals, rec_active)

    def _final(self, k: int, L: np.ndarray, steps: int, record: Record,
               evaluation: tuple[Any, Any, Any, Any]) -> dict[str, Any]:
        """Member ``k``'s final metrics (see :meth:`fit`); ``evaluation``: its train loss, test
        loss, train accuracy and test accuracy."""
        trl, tel, tra, tea = evaluation
        d = self.diverged_step[k]
        lk = L[: (d if d is not None else steps), k]
        lk = lk[np.isfinite(lk)]
        ran = L[: (d + 1 if d is not None else steps), k].tolist()
        self._write_meta(k, record, ran)
        return {
            # one definition of each summary number: stats', as signalprop.train.FitResult's
            "final_loss": stats.final_loss(ran) if d is None else math.nan,
            "min_loss": float(lk.min()) if lk.size else math.nan,
            "train_loss": float(trl),
            "test_loss": float(tel),
            "train_accuracy": float(tra),
            "test_accuracy": float(tea),
            "diverged_step": d,
            "diverged_reason": self.diverged_reason[k],
            "grad_ratio_init": stats.grad_ratio(record, "first"),
            "grad_ratio_final": stats.grad_ratio(record, "last"),
        }

    def _write_meta(self, k: int, record: Record, losses: list[float]) -> None:
        """What :func:`signalprop.train.fit` writes in a record's meta about its run (the same
        keys, by the same function), for member ``k``."""
        from signalprop.train.loop import _write_meta  # lazy: see divergence_policy

        _write_meta(record, self.optimizer_name, float(self.hparams["lr"][k]), losses,
                    self.diverged_reason[k], self.diverged_step[k], self.diverge_factor, False,
                    math.nan, "not computed by the batched engine", 0)

    def _records(self, steps, keys, vals, active) -> list[Record]:
        infos = self.layer_infos()
        recs = []
        for k in range(self.K):
            r = Record(
                meta={
                    "engine": "signalprop.engine",
                    "member": k,
                    "arch": dict(self.arch.__dict__),
                    "optimizer": self.optimizer_name,
                    "hparams": {n: float(v[k]) for n, v in self.hparams.items()},
                    "clip": self.clip,
                    "clip_threshold": float(self.clip_threshold[k]),
                    "act_scale": float(self.act_scale[k]),
                    "dtype": str(self.dtype).replace("torch.", ""),
                }
            )
            for info in infos:
                r.add_layer(info)
            recs.append(r)
        for s, ks, v, act in zip(steps, keys, vals, active, strict=True):
            for k in range(self.K):
                if not act[k]:
                    continue
                row: dict[str, dict[str, float]] = {}
                for (layer, metric), val in zip(ks, v[:, k], strict=True):
                    row.setdefault(layer, {})[metric] = float(val)
                recs[k].add_many(s, row)
        return recs


def _grad_ratios(rec: Record, first: str = "", last: str = "") -> tuple[float, float]:
    """(first, last) recorded :func:`signalprop.stats.grad_ratio` of ``rec`` (the layer names
    are no longer used: the ratio is stats' one definition, the weights nearest input and loss)."""
    return stats.grad_ratio(rec, "first"), stats.grad_ratio(rec, "last")
