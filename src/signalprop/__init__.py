"""signalprop: measure, diagnose and cure vanishing and exploding gradients in PyTorch models.

The data flow, in sub-packages::

    model --> probe --> record --> diagnosis --> remedies / trial --> lab --> report
                 \\________ theory (predictions held against measurements) ________/

Public names are imported lazily so that ``import signalprop`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_LAZY: dict[str, str] = {
    "Record": "signalprop.record:Record",
    "Probe": "signalprop.probe:Probe",
    "probe": "signalprop.probe:probe",
    "every": "signalprop.probe:every",
    "log_spaced": "signalprop.probe:log_spaced",
    "at_steps": "signalprop.probe:at_steps",
    "Finding": "signalprop.diagnosis:Finding",
    "diagnose": "signalprop.diagnosis:diagnose",
    "doctor": "signalprop.doctor:doctor",
    "Report": "signalprop.doctor:Report",
    "trial": "signalprop.trial:trial",
    "sweep": "signalprop.sweep:sweep",
    "load_dataset": "signalprop.data:load_dataset",
}

_SUBMODULES = {
    "theory", "init", "remedies", "engine", "lab", "report", "integrations", "data", "stats",
    "record", "diagnosis", "probe",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name].split(":")
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"signalprop.{name}")
    raise AttributeError(f"module 'signalprop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
