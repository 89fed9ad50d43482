"""Diagnosis: rules that turn a :class:`~signalprop.record.Record` into findings with evidence
and ranked prescriptions.

    >>> from signalprop.diagnosis import diagnose, Thresholds
    >>> findings = diagnose(record, Thresholds(vanishing_ratio=1e-3))   # doctest: +SKIP
"""

from signalprop.diagnosis.context import Context, context_of
from signalprop.diagnosis.findings import (
    KINDS,
    REMEDY_NAMES,
    SEVERITIES,
    Finding,
    Prescription,
    merge_prescriptions,
)
from signalprop.diagnosis.rules import diagnose
from signalprop.diagnosis.thresholds import Thresholds

__all__ = [
    "KINDS",
    "REMEDY_NAMES",
    "SEVERITIES",
    "Context",
    "Finding",
    "Prescription",
    "Thresholds",
    "context_of",
    "diagnose",
    "merge_prescriptions",
]
