"""What a diagnosis returns: findings with evidence and ranked prescriptions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# the one JSON number policy lives with the record; json_number is re-exported (a public name)
from signalprop._registry import check_choice, unknown_name_message
from signalprop.record import from_jsonable
from signalprop.record import json_number as json_number

#: Finding kinds, in the order a report lists them when severities tie.
KINDS: tuple[str, ...] = (
    "nonfinite",
    "divergence",
    "exploding_gradients",
    "vanishing_gradients",
    "exploding_through_time",
    "vanishing_through_time",
    "saturation",
    "dead_units",
    "update_ratio",
    "not_learning",
)

#: Severities, least to most serious.
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")

#: Remedy names a prescription may use. The remedies sub-package registers these names and the
#: doctor runs trials of them, so a prescription never names something that cannot be tried.
REMEDY_NAMES: tuple[str, ...] = (
    "critical_init",
    "orthogonal_init",
    "xavier_init",
    "kaiming_init",
    "lsuv_init",
    "batchnorm",
    "layernorm",
    "weightnorm",
    "residual",
    "highway",
    "relu",
    "scaled_activation",
    "adam",
    "rmsprop",
    "rprop",
    "smorms3",
    "vsgd",
    "layerwise_lr",
    "clip_norm",
    "clip_value",
    "agc",
    "lower_lr",
    "weight_decay",
    "fewer_layers",
    "lstm",
    "gru",
    "orthogonal_recurrent_init",
    "identity_recurrent_init",
    "forget_gate_bias",
    "truncated_bptt",
    "warmup",
    "pre_ln",
)


def severity_rank(severity: str) -> int:
    """0 for ``"info"`` .. 2 for ``"critical"``."""
    return SEVERITIES.index(severity)


@dataclass(frozen=True)
class Prescription:
    """One remedy to try, with why.

    Attributes:
        rank: 1 = try first.
        remedy: A name from :data:`REMEDY_NAMES`.
        reason: One sentence tying the remedy to the evidence.
    """

    rank: int
    remedy: str
    reason: str

    def __post_init__(self) -> None:
        if self.remedy not in REMEDY_NAMES:
            raise ValueError(unknown_name_message("remedy", self.remedy, list(REMEDY_NAMES)))

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "remedy": self.remedy, "reason": self.reason}


@dataclass
class Finding:
    """One problem found in a record.

    Attributes:
        kind: One of :data:`KINDS`.
        layers: Qualified names of the layers concerned (forward order).
        evidence: A sentence or two quoting the numbers.
        severity: One of :data:`SEVERITIES`.
        prescriptions: Remedies, best first.
        numbers: The numbers behind ``evidence`` (machine-readable; NaN/Inf allowed here,
            written as ``null`` in JSON).
    """

    kind: str
    layers: list[str]
    evidence: str
    severity: str
    prescriptions: list[Prescription] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("finding kind", self.kind, KINDS)
        check_choice("severity", self.severity, SEVERITIES)

    @property
    def remedies(self) -> list[str]:
        """Prescribed remedy names, best first."""
        return [p.remedy for p in self.prescriptions]

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (keys: kind, severity, layers, evidence, numbers, prescriptions)."""
        return {
            "kind": self.kind,
            "severity": self.severity,
            "layers": list(self.layers),
            "evidence": self.evidence,
            "numbers": {k: json_number(v) for k, v in self.numbers.items()},
            "prescriptions": [p.to_dict() for p in self.prescriptions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict` (``"NaN"``/``"Infinity"`` and ``null`` numbers come back as floats)."""
        return cls(
            kind=d["kind"],
            layers=list(d.get("layers", [])),
            evidence=d.get("evidence", ""),
            severity=d.get("severity", "warning"),
            prescriptions=[Prescription(**p) for p in d.get("prescriptions", [])],
            numbers={
                k: (math.nan if v is None else from_jsonable(v))
                for k, v in d.get("numbers", {}).items()
            },
        )


def merge_prescriptions(findings: list[Finding]) -> list[Prescription]:
    """One ranked list of remedies over all findings.

    A remedy's score is the sum over findings of ``w(severity) / rank``, with weights 1, 3, 9 for
    info, warning, critical: a remedy ranked first for a critical finding beats one ranked first
    for a warning, and a remedy that helps several findings rises. The reason kept is the one
    from the finding where the remedy ranks best (prefixed with that finding's kind).
    """
    score: dict[str, float] = {}
    best: dict[str, tuple[float, str]] = {}
    for f in findings:
        w = 3.0 ** severity_rank(f.severity)
        for p in f.prescriptions:
            s = w / p.rank
            score[p.remedy] = score.get(p.remedy, 0.0) + s
            if p.remedy not in best or s > best[p.remedy][0]:
                best[p.remedy] = (s, f"[{f.kind}] {p.reason}")
    order = sorted(score, key=lambda r: (-score[r], REMEDY_NAMES.index(r)))
    return [Prescription(i + 1, r, best[r][1]) for i, r in enumerate(order)]
