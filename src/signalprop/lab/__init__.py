"""The lab: studies that settle the classic claims about vanishing/exploding gradients.

Each study is a module with the same shape (see :mod:`signalprop.lab.base`): ``get_config(quick)``,
``run(config, workdir)``, ``conclude(data) -> Conclusion`` and ``figures(data, workdir)``.
:data:`STUDIES` maps the study names (a contract: the CLI and the report use them) to their modules.

>>> from signalprop.lab import run_lab
>>> outcomes = run_lab(["mnist1d-baseline"], "lab-out", quick=True)  # doctest: +SKIP

or ``signalprop lab run all --quick --out lab-out`` and open ``lab-out/index.html``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from signalprop._registry import Registry
from signalprop.lab.base import CONTRADICTS, INCONCLUSIVE, SUPPORTS, Conclusion

#: study name -> module path (imported on first use, so one study's import cannot break the rest)
STUDIES: Registry = Registry("study")
for _name, _mod in [
    ("saturation", "signalprop.lab.saturation"),
    ("learning-rate", "signalprop.lab.learning_rate"),
    ("initialisation", "signalprop.lab.initialisation"),
    ("any-nonlinearity", "signalprop.lab.any_nonlinearity"),
    ("remedies", "signalprop.lab.remedy_ranking"),
    ("clipping", "signalprop.lab.clipping"),
    ("bn-depth", "signalprop.lab.bn_depth"),
    ("isometry", "signalprop.lab.isometry"),
    ("mnist1d-baseline", "signalprop.lab.mnist1d_baseline"),
    ("recurrent", "signalprop.lab.recurrent"),
    ("normalisation-placement", "signalprop.lab.normalisation_placement"),
]:
    STUDIES.register(_name, _mod)

#: The studies in report order.
STUDY_NAMES: list[str] = [
    "saturation",
    "learning-rate",
    "initialisation",
    "any-nonlinearity",
    "remedies",
    "clipping",
    "bn-depth",
    "isometry",
    "mnist1d-baseline",
    "recurrent",
    "normalisation-placement",
]


def get_study(name: str) -> ModuleType:
    """The module of a registered study (``ValueError`` naming the valid studies otherwise)."""
    return importlib.import_module(STUDIES.get(name))


def __getattr__(name: str):  # lazy: the runner imports the report, which imports the registry
    if name in ("run_study", "run_lab", "StudyOutcome", "resolve_names"):
        from signalprop.lab import runner

        return getattr(runner, name)
    if name == "build_report":
        from signalprop.lab.report import build_report

        return build_report
    raise AttributeError(f"module 'signalprop.lab' has no attribute {name!r}")


__all__ = [
    "STUDIES",
    "STUDY_NAMES",
    "get_study",
    "run_study",
    "run_lab",
    "build_report",
    "Conclusion",
    "SUPPORTS",
    "CONTRADICTS",
    "INCONCLUSIVE",
]
