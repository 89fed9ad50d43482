"""Remedy trials: apply each remedy to fresh copies of a model, train them side by side, measure.

    from signalprop import trial
    table = trial(make_model, load_dataset("digits"), F.cross_entropy,
                  remedies=["batchnorm", "adam", "residual"], steps=200, seeds=3)
    print(table)              # a readable table; table.to_dataframe(), table.to_dict()

Every remedy (and the baseline) is trained ``seeds`` times; seed s builds its model with
``torch.manual_seed(seed + s)`` before calling the factory, so the baseline and each remedy start
from the *same* weights for a given seed and see the same data order (a paired comparison).
A run that diverges (non-finite loss or gradient) is a recorded outcome, never a crash, and so is
a remedy that cannot be applied to the model (verdict ``not applicable``, the reason kept in the
row). A remedy is ``better`` only if it also beats the trivial baseline: the loss of the best
constant prediction (see :class:`signalprop.train.TrivialBaseline`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from signalprop import stats
from signalprop._callable import make_module_callable
from signalprop.record import Record, to_jsonable
from signalprop.remedies import Remedy, get_remedy
from signalprop.train import FitResult, example_inputs, fit, to_device

BASELINE = "baseline"

ModelFactory = Callable[[], nn.Module] | nn.Module

#: Errors from applying a remedy that mean "this remedy does not fit this model" (recorded in the
#: row), not a bug in the caller's code.
_APPLY_ERRORS = (ValueError, TypeError, ImportError, NotImplementedError, RuntimeError)


@dataclass
class RunSummary:
    """One training run (one remedy, one seed).

    Attributes:
        seed: The seed.
        final_loss: Mean of the last ``min(10, steps)`` losses (NaN when diverged).
        init_loss: Loss at the first step.
        diverged: Non-finite loss/gradient (or above ``diverge_above``).
        diverged_step: Step at which it diverged.
        grad_ratio: ||dL/dW_first|| / ||dL/dW_last|| over the weight matrices at the last recorded
            step (< 1: gradients vanish towards the input; > 1: they explode there).
        saturated_frac: Mean over saturating activation layers of the saturated fraction.
        dead_frac: Mean over rectifier layers of the dead-unit fraction.
        wall_time: Seconds of training.
        losses: The loss at every step.
    """

    seed: int
    final_loss: float
    init_loss: float
    diverged: bool
    diverged_step: int | None
    grad_ratio: float
    saturated_frac: float
    dead_frac: float
    wall_time: float
    losses: list[float] = field(default_factory=list, repr=False)


@dataclass
class TrialRow:
    """A remedy's outcome aggregated over seeds.

    Attributes:
        remedy: Remedy name (``"baseline"`` for the untreated model).
        description: What the remedy does.
        seeds: Number of runs.
        loss_mean, loss_std: Loss after ``steps`` steps over the runs that did not diverge.
        init_loss: Mean first-step loss.
        grad_ratio: Geometric mean over runs of the first/last-layer gradient ratio.
        saturated_frac, dead_frac: Means over runs (NaN when the model has no such layers).
        diverged: Number of diverged runs; ``diverged_frac`` the fraction.
        wall_time: Mean seconds per run.
        delta_loss: loss_mean - baseline loss_mean (NaN for the baseline).
        rel_change: delta_loss / baseline loss_mean.
        verdict: ``better`` / ``worse`` / ``no change`` (versus the baseline; see
            :func:`verdict`), ``no better than trivial`` (lower than the baseline but not below
            the best constant prediction's loss), ``diverged`` (every run), ``baseline``,
            ``not applicable`` (a structural remedy whose pattern the model lacks) or ``error``
            (training failed).
        error: Why the remedy could not be applied or trained (else ``None``).
    """

    remedy: str
    description: str = ""
    seeds: int = 0
    loss_mean: float = math.nan
    loss_std: float = math.nan
    init_loss: float = math.nan
    grad_ratio: float = math.nan
    saturated_frac: float = math.nan
    dead_frac: float = math.nan
    diverged: int = 0
    diverged_frac: float = 0.0
    wall_time: float = math.nan
    delta_loss: float = math.nan
    rel_change: float = math.nan
    verdict: str = ""
    error: str | None = None
    runs: list[RunSummary] = field(default_factory=list, repr=False)

    def to_dict(self, runs: bool = False) -> dict[str, Any]:
        """JSON-compatible dict (NaN/Inf as ``None``); per-run details when ``runs``."""
        d = {k: _json(v) for k, v in asdict(self).items() if k != "runs"}
        if runs:
            d["runs"] = [{k: _json(v) for k, v in asdict(r).items()} for r in self.runs]
        return d


def _json(v: Any) -> Any:
    return to_jsonable(v, strict=False)  # the one NaN policy (signalprop.record)


_COLUMNS = [
    ("remedy", "remedy"),
    ("loss", "loss after N"),
    ("delta", "vs baseline"),
    ("grad_ratio", "grad first/last"),
    ("saturated", "saturated"),
    ("dead", "dead"),
    ("diverged", "diverged"),
    ("time", "time/run"),
    ("verdict", "verdict"),
]


def _fmt_num(v: float, spec: str = ".3f") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def _cells(r: TrialRow) -> dict[str, str]:
    if r.error is not None:
        return {"remedy": r.remedy, "verdict": r.verdict or "error", "loss": "-", "delta": "-",
                "grad_ratio": "-", "saturated": "-", "dead": "-", "diverged": "-", "time": "-"}
    loss = _fmt_num(r.loss_mean, ".4f")
    if r.seeds > 1 and math.isfinite(r.loss_std):
        loss += f" ± {r.loss_std:.4f}"
    delta = "" if r.remedy == BASELINE else (
        "-" if not math.isfinite(r.rel_change) else f"{r.rel_change:+.1%}")
    return {
        "remedy": r.remedy,
        "loss": loss,
        "delta": delta,
        "grad_ratio": _fmt_num(r.grad_ratio, ".2e"),
        "saturated": _fmt_num(r.saturated_frac, ".0%"),
        "dead": _fmt_num(r.dead_frac, ".0%"),
        "diverged": f"{r.diverged}/{r.seeds}",
        "time": _fmt_num(r.wall_time, ".2f") + "s" if math.isfinite(r.wall_time) else "-",
        "verdict": r.verdict,
    }


@dataclass
class TrialTable:
    """The result of :func:`trial`: one :class:`TrialRow` per remedy (baseline first).

    Attributes:
        rows: The rows.
        meta: Settings (steps, seeds, optimizer, lr, batch size, device).
        records: Remedy name -> probe records of each seed (only with ``keep_records=True``).
    """

    rows: list[TrialRow]
    meta: dict[str, Any] = field(default_factory=dict)
    records: dict[str, list[Record]] = field(default_factory=dict, repr=False)

    def __iter__(self) -> Iterator[TrialRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str | int) -> TrialRow:
        if isinstance(name, int):
            return self.rows[name]
        for r in self.rows:
            if r.remedy == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.remedy for r in self.rows]}")

    @property
    def baseline(self) -> TrialRow | None:
        return next((r for r in self.rows if r.remedy == BASELINE), None)

    def best(self) -> TrialRow | None:
        """The remedy (not the baseline) with the lowest mean loss among those not all diverged."""
        ok = [r for r in self.rows if r.remedy != BASELINE and r.error is None
              and math.isfinite(r.loss_mean)]
        return min(ok, key=lambda r: r.loss_mean) if ok else None

    def improved(self) -> list[TrialRow]:
        """Rows whose verdict is ``better``."""
        return [r for r in self.rows if r.verdict == "better"]

    def to_dict(self, runs: bool = False) -> dict[str, Any]:
        """``{"meta": ..., "rows": [...]}``, JSON-compatible."""
        return {"meta": {k: _json(v) for k, v in self.meta.items()},
                "rows": [r.to_dict(runs) for r in self.rows]}

    def to_dataframe(self) -> Any:
        """One row per remedy (``pandas.DataFrame``; the ``runs`` detail is left out)."""
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in asdict(r).items() if k != "runs"}
                             for r in self.rows])

    def __str__(self) -> str:
        head = [h for _, h in _COLUMNS]
        body = [[_cells(r)[k] for k, _ in _COLUMNS] for r in self.rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
                  for i, h in enumerate(head)]
        lines = [self._title(), "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
        errs = [r for r in self.rows if r.error]
        lines += [f"  {r.remedy}: " + ("not applicable: " if r.verdict == "not applicable"
                                        else "") + str(r.error) for r in errs]
        return "\n".join(lines)

    def _title(self) -> str:
        m = self.meta
        return (f"remedy trial: {m.get('steps')} steps x {m.get('seeds')} seed(s), "
                f"{m.get('optimizer')} lr={m.get('lr')}")

    def rich_table(self) -> Any:
        """A ``rich.table.Table`` of the rows (verdicts coloured)."""
        from rich.table import Table

        t = Table(title=self._title())
        for key, h in _COLUMNS:
            t.add_column(h, justify="left" if key in ("remedy", "verdict") else "right")
        colour = {"better": "green", "worse": "red", "diverged": "bold red", "error": "yellow",
                  "not applicable": "dim", "no better than trivial": "yellow"}
        for r in self.rows:
            c = _cells(r)
            cells = [c[k] for k, _ in _COLUMNS]
            style = colour.get(r.verdict)
            if style:
                cells[-1] = f"[{style}]{cells[-1]}[/{style}]"
            t.add_row(*cells)
        return t

    def __rich__(self) -> Any:
        return self.rich_table()


def verdict(
    base: Sequence[float], rem: Sequence[float], rel_tol: float = 0.02
) -> str:
    """``better``/``worse``/``no change`` of a remedy's final losses against the baseline's.

    Paired by seed where both runs finished: the mean difference d must exceed both
    ``rel_tol`` x |baseline mean| and, with >= 2 pairs, twice its standard error.
    """
    pairs = [(b, r) for b, r in zip(base, rem, strict=False)
             if math.isfinite(b) and math.isfinite(r)]
    if not pairs:
        return "no change"
    d = np.array([r - b for b, r in pairs])
    bmean = float(np.mean([b for b, _ in pairs]))
    thr = rel_tol * abs(bmean)
    if len(d) >= 2:
        thr = max(thr, 2 * float(d.std(ddof=1)) / math.sqrt(len(d)))
    m = float(d.mean())
    if m < -thr:
        return "better"
    if m > thr:
        return "worse"
    return "no change"


def summarise_record(rec: Record) -> dict[str, float]:
    """grad_ratio, saturated_frac and dead_frac at the record's last step that has gradients
    (the definitions of :mod:`signalprop.stats`)."""
    return {"grad_ratio": stats.grad_ratio(rec), "saturated_frac": stats.saturated_frac(rec),
            "dead_frac": stats.dead_frac(rec)}


def _fresh_model(factory: ModelFactory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if isinstance(factory, nn.Module):
        return copy.deepcopy(factory)
    m = factory()
    if not isinstance(m, nn.Module):
        raise TypeError(f"model_factory must return an nn.Module, got {type(m).__name__}")
    return m


def _gmean(xs: list[float]) -> float:
    v = [x for x in xs if math.isfinite(x) and x >= 0]
    if not v:
        return math.nan
    if min(v) == 0:
        return 0.0
    return float(np.exp(np.mean(np.log(v))))


def _mean(xs: list[float]) -> float:
    v = [x for x in xs if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


# long: 22 documented arguments take 71 of its lines; the runs are in _Runner below it
def trial(
    model_factory: ModelFactory,
    data: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    remedies: Sequence[str | Remedy] = ("batchnorm", "adam", "residual"),
    *,
    step_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    steps: int = 200,
    seeds: int = 3,
    seed: int = 0,
    baseline: bool = True,
    optimizer: str | Callable[..., torch.optim.Optimizer] = "sgd",
    lr: float = 0.1,
    optimizer_kwargs: dict[str, Any] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    probe: bool = True,
    diverge_above: float | None = None,
    keep_records: bool = False,
    strict: bool = False,
    rel_tol: float = 0.02,
    progress: Callable[[str, int, RunSummary], None] | None = None,
    fit_kwargs: dict[str, Any] | None = None,
) -> TrialTable:
    """Train the model with each remedy (and without) and tabulate what each one did.

    Every run goes through :func:`signalprop.train.fit`, so any model and batch form that
    ``fit`` trains can be trialled. Remedies that do not change the model's structure (inits,
    optimisers, clipping, rates, warm-up) apply to any model; a structural one (batch norm,
    skips, ...) whose pattern the model lacks gets the verdict ``not applicable`` with the reason.

    Args:
        model_factory: ``() -> nn.Module`` building a fresh model (called under
            ``torch.manual_seed(seed + s)`` for seed s), or a model instance (deep-copied: every
            run then starts from its current weights).
        data: Anything :func:`signalprop.train.fit` takes (tensors, a Dataset, a DataLoader of
            tuples or dicts).
        loss_fn: ``loss_fn(prediction, y)`` / ``loss_fn(prediction, batch)`` -> scalar, or
            ``None`` when the model returns its loss.
        remedies: Registered names (``"batchnorm"``, ``"batchnorm+adam"``) or :class:`Remedy`
            objects.
        step_fn: ``step_fn(model, batch) -> loss`` instead of the forward pass and ``loss_fn``.
        steps: Optimiser steps per run (N).
        seeds: Runs per remedy.
        seed: First seed.
        baseline: Also train the untreated model (row ``"baseline"``, first).
        optimizer, lr, optimizer_kwargs: The baseline's optimiser; a remedy may switch it
            (:meth:`Remedy.optimizer_config`).
        batch_size: Mini-batch size for datasets and tensors in memory.
        device: Where to train.
        probe: Probe the first and last steps for the gradient ratio and saturation columns.
        diverge_above: Also count a run as diverged when its final loss exceeds this.
        keep_records: Keep each run's probe record in ``table.records``.
        strict: Re-raise a remedy's application error instead of recording it.
        rel_tol: Relative loss change below which the verdict is ``no change``.
        progress: Optional callback ``(remedy, seed, RunSummary)`` after each run.
        fit_kwargs: More arguments for :func:`signalprop.train.fit` (``scaler``, ``amp``,
            ``accumulate``, ``clip``, ...), the same for every run.

    Returns:
        :class:`TrialTable`. A verdict is ``better`` only when the remedy also beats the trivial
        baseline (the best constant prediction, ``table.meta["trivial_loss"]``); a lower loss
        that does not is ``no better than trivial``. Ctrl-C stops the trial and returns the rows
        done so far (``table.meta["interrupted"]``).

    Raises:
        ValueError: an unknown remedy name (listing the valid ones), steps/seeds < 1.
    """
    plan = _plan(remedies, baseline, steps, seeds, optimizer)
    dev = torch.device(device)
    xb = example_inputs(data, batch_size)
    if xb is not None:
        xb = to_device(xb, dev)
    table = TrialTable(rows=[], meta={
        "steps": steps, "seeds": seeds, "seed": seed, "optimizer": optimizer if isinstance(
            optimizer, str) else getattr(optimizer, "__name__", "custom"),
        "lr": lr, "batch_size": batch_size, "device": str(dev),
    })
    runner = _Runner(model_factory, data, loss_fn, step_fn, steps, optimizer, lr,
                     optimizer_kwargs, batch_size, dev, probe, diverge_above, keep_records,
                     strict, progress, dict(fit_kwargs or {}), xb, table)
    interrupted = False
    for rem in plan:
        row = TrialRow(remedy=BASELINE if rem is None else rem.name,
                       description="untreated model" if rem is None else rem.description)
        interrupted = runner.run_row(rem, row, range(seed, seed + seeds))
        _aggregate(row)
        table.rows.append(row)
        if interrupted:
            break
    table.meta["trivial_loss"] = float(np.mean(runner.trivial)) if runner.trivial else math.nan
    table.meta["interrupted"] = interrupted
    _compare(table, rel_tol)
    return table


def _plan(remedies: Sequence[str | Remedy] | str | Remedy, baseline: bool, steps: int,
          seeds: int, optimizer: Any) -> list[Remedy | None]:
    """Refuse bad arguments before any training; the rows to run (``None``: the baseline)."""
    if steps < 1 or seeds < 1:
        raise ValueError(f"steps and seeds must be >= 1, got steps={steps}, seeds={seeds}")
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "trial needs an optimiser name or factory (each run builds its own optimiser), "
            "not an optimiser instance"
        )
    if isinstance(remedies, str | Remedy):
        remedies = [remedies]
    resolved = [get_remedy(r) for r in remedies]  # unknown names fail here, before any training
    names = [r.name for r in resolved]
    if len(set(names)) != len(names) or BASELINE in names:
        raise ValueError(f"remedy names must be unique and not {BASELINE!r}: {names}")
    return ([None] if baseline else []) + list(resolved)


@dataclass
class _Runner:
    """The settings every run of one :func:`trial` shares, and the runs of one row."""

    model_factory: ModelFactory
    data: Any
    loss_fn: Callable[[Any, Any], torch.Tensor] | None
    step_fn: Callable[[nn.Module, Any], torch.Tensor] | None
    steps: int
    optimizer: Any
    lr: float
    optimizer_kwargs: dict[str, Any] | None
    batch_size: int
    dev: torch.device
    probe: bool
    diverge_above: float | None
    keep_records: bool
    strict: bool
    progress: Callable[[str, int, RunSummary], None] | None
    extra: dict[str, Any]
    xb: Any
    table: TrialTable
    trivial: list[float] = field(default_factory=list)

    def run_row(self, rem: Remedy | None, row: TrialRow, seeds: range) -> bool:
        """Train ``rem`` (``None``: the baseline) once per seed into ``row``; whether Ctrl-C
        stopped a run. A remedy that does not fit the model ends the row with its error."""
        opt, rlr, kw = (self.optimizer, self.lr, dict(self.optimizer_kwargs or {})) \
            if rem is None else rem.optimizer_config(self.optimizer, self.lr,
                                                     self.optimizer_kwargs)
        warm = int(round(rem.warmup * self.steps)) if rem is not None else 0
        for s in seeds:
            model = _fresh_model(self.model_factory, s).to(self.dev)
            gt = None
            if rem is not None:
                try:
                    model = rem.apply(model, self.xb).to(self.dev)
                    gt = rem.make_grad_transform()
                except Exception as e:  # whatever the rewrite hits on this model: it does not fit
                    if self.strict:
                        raise
                    row.error = f"{type(e).__name__}: {e}"
                    row.verdict = "not applicable"
                    return False
            probe_cfg: Any = {"schedule": sorted({0, self.steps - 1})} if self.probe else None
            try:
                res = fit(model, self.data, self.loss_fn, step_fn=self.step_fn, steps=self.steps,
                          optimizer=opt, lr=rlr, optimizer_kwargs=kw,
                          batch_size=self.batch_size, probe=probe_cfg, grad_transform=gt,
                          device=self.dev, seed=s, **({"warmup": warm} if warm else {}),
                          **self.extra)
            except _APPLY_ERRORS as e:
                if self.strict or rem is None:
                    raise  # the baseline itself failing is the caller's error
                row.error = f"{type(e).__name__}: {e}"
                return False
            run = self.summarise(res, s)
            row.runs.append(run)
            if self.keep_records:
                self.table.records.setdefault(row.remedy, []).append(res.record)
            if self.progress is not None:
                self.progress(row.remedy, s, run)
            if res.interrupted:
                return True
        return False

    def summarise(self, res: FitResult, s: int) -> RunSummary:
        """One run's summary; ``diverge_above`` also counts a final loss above it."""
        if math.isfinite(res.trivial_loss):
            self.trivial.append(res.trivial_loss)
        summ = summarise_record(res.record) if self.probe else {
            "grad_ratio": math.nan, "saturated_frac": math.nan, "dead_frac": math.nan}
        diverged = res.diverged
        final = res.final_loss
        if not diverged and self.diverge_above is not None and not final <= self.diverge_above:
            diverged = True
        return RunSummary(
            seed=s,
            final_loss=math.nan if diverged else final,
            init_loss=res.losses[0] if res.losses else math.nan,
            diverged=diverged,
            diverged_step=res.diverged_step if res.diverged else (
                len(res.losses) - 1 if diverged else None),
            grad_ratio=summ["grad_ratio"],
            saturated_frac=summ["saturated_frac"],
            dead_frac=summ["dead_frac"],
            wall_time=res.wall_time,
            losses=list(res.losses),
        )


def _aggregate(row: TrialRow) -> None:
    runs = row.runs
    row.seeds = len(runs)
    if not runs:
        return
    finals = [r.final_loss for r in runs if not r.diverged]
    row.loss_mean = float(np.mean(finals)) if finals else math.nan
    row.loss_std = float(np.std(finals, ddof=1)) if len(finals) > 1 else (0.0 if finals else math.nan)
    row.init_loss = _mean([r.init_loss for r in runs])
    row.grad_ratio = _gmean([r.grad_ratio for r in runs])
    row.saturated_frac = _mean([r.saturated_frac for r in runs])
    row.dead_frac = _mean([r.dead_frac for r in runs])
    row.diverged = sum(r.diverged for r in runs)
    row.diverged_frac = row.diverged / len(runs)
    row.wall_time = _mean([r.wall_time for r in runs])


def _compare(table: TrialTable, rel_tol: float) -> None:
    base = table.baseline
    trivial = table.meta.get("trivial_loss", math.nan)
    for r in table.rows:
        if r.verdict == "not applicable":
            pass
        elif r.error is not None:
            r.verdict = "error"
        elif r.remedy == BASELINE:
            r.verdict = "baseline" if r.diverged < r.seeds else "diverged"
        elif r.seeds and r.diverged == r.seeds:
            r.verdict = "diverged"
        elif base is None or base.seeds == 0:
            r.verdict = ""
        elif base.diverged == base.seeds:
            r.verdict = "better"  # it trains where the baseline diverged every time
        else:
            b = {x.seed: x.final_loss for x in base.runs}
            pairs = [(b.get(x.seed, math.nan), x.final_loss) for x in r.runs]
            r.verdict = verdict([p[0] for p in pairs], [p[1] for p in pairs], rel_tol)
            if r.diverged and r.verdict == "better":
                r.verdict = "better (some diverged)"
        if r.verdict.startswith("better") and stats.beats_trivial(r.loss_mean, trivial) is False:
            # lower than the baseline's loss but not below the best constant prediction's:
            # the remedy did not make the model learn anything
            r.verdict = "no better than trivial"
        if base is not None and r.remedy != BASELINE and math.isfinite(base.loss_mean):
            r.delta_loss = r.loss_mean - base.loss_mean
            r.rel_change = r.delta_loss / base.loss_mean if base.loss_mean else math.nan


# ``signalprop.trial`` is both this module and the trial() function (see signalprop._callable)
make_module_callable(__name__, "trial")
