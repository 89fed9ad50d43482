"""The doctor's result: :class:`Report` (findings, prescriptions, the record, trials) and its
JSON/HTML forms.

Its own module so that the HTML page (:mod:`signalprop.report.doctor_page`) can name the type
without importing the doctor, which imports the training loop, the probe and the trials.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signalprop import stats
from signalprop.diagnosis.findings import SEVERITIES, Finding
from signalprop.diagnosis.prescriptions import Prescription
from signalprop.record import Record, atomic_write_text, to_jsonable

#: Version of the JSON written by :meth:`Report.to_json`.
REPORT_SCHEMA = "signalprop.report/1"


def _jsonable(obj: Any) -> Any:
    """JSON-safe values for the report: :func:`signalprop.record.to_jsonable`, lenient (objects
    with ``to_dict`` through it, anything else as ``str``)."""
    return to_jsonable(obj, strict=False)


@dataclass
class Report:
    """What the doctor found.

    Attributes:
        findings: Findings, most severe first (empty: nothing found).
        prescriptions: One ranked list of remedies over all findings.
        record: The probe's record of the training run.
        trials: Trial results when the doctor ran trials, else ``[]``: one dict per remedy
            (baseline first) with the ``signalprop.trial.TrialRow`` fields (loss_mean, verdict,
            grad_ratio, ...) and ``losses``, the loss curve averaged over seeds.
        meta: Run settings and environment (model, data, optimiser, lr, steps, timings ...).
        losses: The training loss at every step.
        trial_table: The ``signalprop.trial.TrialTable`` behind ``trials`` (not serialised).
        explanation: Mean-field prediction of the gradient profile beside the measurement
            (:class:`signalprop.diagnosis.explain.Explanation`; ``None`` when the record does not
            support one). In JSON under ``"explanation"``.
    """

    findings: list[Finding]
    prescriptions: list[Prescription]
    record: Record
    trials: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    trial_table: Any = field(default=None, repr=False)
    explanation: Any = field(default=None, repr=False)

    @property
    def healthy(self) -> bool:
        """No finding at all."""
        return not self.findings

    @property
    def kinds(self) -> list[str]:
        """Finding kinds, in report order."""
        return [f.kind for f in self.findings]

    def finding(self, kind: str) -> Finding | None:
        """The first finding of ``kind`` or ``None``."""
        return next((f for f in self.findings if f.kind == kind), None)

    def summary(self) -> dict[str, Any]:
        """Headline numbers: verdict, worst severity, losses, divergence, top remedies."""
        worst = max((SEVERITIES.index(f.severity) for f in self.findings), default=-1)
        finite = [v for v in self.losses if math.isfinite(v)]
        return {
            "healthy": self.healthy,
            "n_findings": len(self.findings),
            "kinds": self.kinds,
            "worst_severity": SEVERITIES[worst] if worst >= 0 else None,
            "steps": len(self.losses),
            "initial_loss": finite[0] if finite else None,
            # like FitResult.final_loss: a diverged run has no final loss
            "final_loss": stats.final_loss(finite)
            if finite and not self.meta.get("diverged", False) else None,
            "diverged": self.meta.get("diverged", False),
            "diverged_step": self.meta.get("diverged_step"),
            "interrupted": self.meta.get("interrupted", False),
            "trivial_loss": self.meta.get("trivial_loss"),
            "prescriptions": [p.to_dict() for p in self.prescriptions],
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict with stable keys ``schema, findings, summary, trials, meta``
        (and ``explanation`` when there is one)."""
        d = {
            "schema": REPORT_SCHEMA,
            "findings": [f.to_dict() for f in self.findings],
            "summary": _jsonable(self.summary()),
            "trials": _jsonable(self.trials),
            "meta": _jsonable(self.meta),
        }
        if self.explanation is not None:
            d["explanation"] = _jsonable(self.explanation.to_dict())
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text (NaN/Inf written as ``"NaN"``/``"Infinity"``, see
        :mod:`signalprop.record`)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML report (figures embedded) to ``path``."""
        # lazy: the page imports jinja2 and matplotlib (about 1.4 s measured), not needed to diagnose
        from signalprop.report.doctor_page import render_report

        path = Path(path)
        atomic_write_text(path, render_report(self))
        return path

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``report.html``, ``report.json`` and ``record.json.gz`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "html": self.to_html(out / "report.html"),
            "json": out / "report.json",
            "record": self.record.save(out / "record.json.gz"),
        }
        atomic_write_text(paths["json"], self.to_json())
        return paths

    def __repr__(self) -> str:
        kinds = ", ".join(f"{f.kind}({f.severity})" for f in self.findings) or "healthy"
        return f"Report({kinds}; {len(self.losses)} steps, {len(self.trials)} trials)"
