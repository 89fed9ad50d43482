"""Sweeps: grids of runs, grouped by architecture, trained as populations, stored resumably.

- :func:`sweep` (also ``signalprop.sweep``): run a grid; :func:`load`: open a sweep directory.
- :data:`SCHEMA`, :func:`validate_config`: the flat run config (docs/sweep.md).
- :func:`expand_grid`, :func:`group_runs`: grids -> runs -> populations.
- :class:`SweepResult`: ``to_dataframe()``, ``to_csv()``, ``record(run_id)``.
- :class:`RunOutcome`: what training one run gave (the store's input, every executor's output).
"""


from signalprop._callable import make_module_callable
from signalprop.sweep.config import PER_RUN, SCHEMA, config_hash, group_key, validate_config
from signalprop.sweep.grid import RunSpec, expand_grid, group_runs, load_grid_file
from signalprop.sweep.result import METRICS, SweepResult, load
from signalprop.sweep.runner import EXECUTORS, run_group, sweep
from signalprop.sweep.store import STATUSES, RunOutcome, Store

__all__ = [
    "EXECUTORS",
    "METRICS",
    "PER_RUN",
    "SCHEMA",
    "STATUSES",
    "RunOutcome",
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


# ``signalprop.sweep`` is both this package and the sweep() function (see signalprop._callable)
make_module_callable(__name__, "sweep")
