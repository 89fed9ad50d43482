"""Sweeps: grids of runs, grouped by architecture, trained as populations, stored resumably.

- :func:`sweep` (also ``signalprop.sweep``): run a grid; :func:`load`: open a sweep directory.
- :data:`SCHEMA`, :func:`validate_config`: the flat run config (docs/sweep.md).
- :func:`expand_grid`, :func:`group_runs`: grids -> runs -> populations.
- :class:`SweepResult`: ``to_dataframe()``, ``to_csv()``, ``record(run_id)``.
"""

import sys
import types
from typing import Any

from signalprop.sweep.config import PER_RUN, SCHEMA, config_hash, group_key, validate_config
from signalprop.sweep.grid import RunSpec, expand_grid, group_runs, load_grid_file
from signalprop.sweep.result import METRICS, SweepResult, load
from signalprop.sweep.runner import EXECUTORS, run_group, sweep
from signalprop.sweep.store import STATUSES, Store

__all__ = [
    "EXECUTORS",
    "METRICS",
    "PER_RUN",
    "SCHEMA",
    "STATUSES",
    "RunSpec",
    "Store",
    "SweepResult",
    "config_hash",
    "expand_grid",
    "group_key",
    "group_runs",
    "load",
    "load_grid_file",
    "run_group",
    "sweep",
    "validate_config",
]


class _CallableModule(types.ModuleType):
    """``signalprop.sweep`` is both this package and the function :func:`sweep`: once the
    package is imported (``from signalprop.sweep import ...``), the attribute ``signalprop.sweep``
    is the module, so the module itself must be callable for ``signalprop.sweep(grid)`` to work."""

    def __call__(self, *args: Any, **kwargs: Any) -> SweepResult:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
