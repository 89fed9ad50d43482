"""Grids: a base config, the product of named axes, and seeds -> a list of validated runs."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signalprop._registry import unknown_name_message
from signalprop.sweep.config import SCHEMA, config_hash, group_key, validate_config

GRID_KEYS = ("base", "axes", "seeds", "name", "description")

#: Most runs a grid may expand to unless the caller raises the limit (``--max-runs``): a typo
#: such as ``seeds: 100000`` should be a question, not hours of work and GBs of configs.
MAX_RUNS = 2000

#: Limits on sweep config files: bytes on disk and values after YAML aliases are expanded (a
#: 500-byte "billion laughs" file expands to GBs once its aliases are copied out).
MAX_CONFIG_BYTES = 4 * 2**20
MAX_CONFIG_VALUES = 200_000


@dataclass(frozen=True)
class RunSpec:
    """One run: its normalised config, its axis labels, its id (content hash) and its group."""

    config: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    index: int = 0

    @property
    def run_id(self) -> str:
        return config_hash(self.config, self.labels)

    @property
    def group(self) -> str:
        return group_key(self.config)


def _label(v: Any) -> str:
    if isinstance(v, Mapping):
        return ",".join(f"{k}={v[k]}" for k in sorted(v)) or "default"
    return str(v)


def _axis_values(name: str, values: Any) -> list[tuple[str | None, dict[str, Any]]]:
    """An axis -> [(label or None, overrides)]."""
    if isinstance(values, Mapping):  # named variants {label: {key: value}}
        out = []
        for lab, ov in values.items():
            if ov is None:
                ov = {}
            if not isinstance(ov, Mapping):
                raise ValueError(f"axis {name!r}: variant {lab!r} must be a mapping of overrides")
            out.append((str(lab), dict(ov)))
        if not out:
            raise ValueError(f"axis {name!r} has no values")
        return out
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"axis {name!r}: expected a list of values, got {values!r}")
    if not values:
        raise ValueError(f"axis {name!r} has no values")
    if name in SCHEMA:
        return [(None, {name: v}) for v in values]
    if all(isinstance(v, Mapping) for v in values):
        return [(_label(v), dict(v)) for v in values]
    raise ValueError(
        unknown_name_message("axis (run-config key)", name, sorted(SCHEMA))
        + "; an axis with another name needs named variants {label: {key: value}}"
    )


def _too_many(n: int, what: str, max_runs: int) -> ValueError:
    return ValueError(
        f"the grid has {n:,} runs ({what}), more than the limit of {max_runs:,}: shrink it, or "
        f"raise the limit with --max-runs {n} (sweep(..., max_runs={n}))")


def expand_grid(grid: Any, max_runs: int | None = MAX_RUNS) -> list[RunSpec]:
    """Expand a grid into runs (validated; duplicates removed, first occurrence kept).

    Args:
        grid: A mapping with ``base``, ``axes``, ``seeds`` (see docs/sweep.md), a list of run
            configs, or a path to a YAML file holding either.
        max_runs: Refuse grids of more runs than this, counted before anything is expanded
            (``None``: no limit).

    Raises:
        ValueError: for an unknown grid key, axis, config key or value (naming valid choices),
            an empty grid, or more than ``max_runs`` runs.

    Example:
        >>> specs = expand_grid({"axes": {"lr": [0.01, 0.1]}, "seeds": 2})
        >>> [(s.config["lr"], s.config["seed"]) for s in specs]
        [(0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)]
    """
    if max_runs is not None and (isinstance(max_runs, bool) or not isinstance(max_runs, int)
                                 or max_runs < 1):
        raise ValueError(f"max_runs must be an integer >= 1, got {max_runs!r}")
    if isinstance(grid, (str, os.PathLike)):
        grid = load_grid_file(grid)
    if isinstance(grid, Sequence) and not isinstance(grid, (str, bytes)):
        if max_runs is not None and len(grid) > max_runs:
            raise _too_many(len(grid), "a list of configs", max_runs)
        specs = [RunSpec(validate_config(c), {}, i) for i, c in enumerate(grid)]
        return _dedupe(specs)
    if not isinstance(grid, Mapping):
        raise ValueError(f"a grid must be a mapping or a list of configs, got {type(grid).__name__}")
    for k in grid:
        if k not in GRID_KEYS:
            raise ValueError(unknown_name_message("grid key", k, list(GRID_KEYS)))
    if not any(k in grid for k in ("base", "axes", "seeds")):
        raise ValueError("the grid is empty: give at least one of base, axes or seeds "
                         "(docs/sweep.md); an empty grid would silently run one default config")
    base = dict(grid.get("base") or {})
    axes = grid.get("axes") or {}
    if not isinstance(axes, Mapping):
        raise ValueError("grid: axes must be a mapping {name: [values]}")
    seeds = _grid_seeds(grid.get("seeds"), base, max_runs)
    names = list(axes)
    _check_run_count(axes, len(seeds), max_runs)
    choices = [_axis_values(n, axes[n]) for n in names]
    specs = []
    for combo in itertools.product(*choices):
        cfg = dict(base)
        labels = {}
        for n, (lab, ov) in zip(names, combo, strict=True):
            cfg.update(ov)
            if lab is not None:
                labels[n] = lab
        for s in seeds:
            c = dict(cfg)
            c["seed"] = s
            specs.append(RunSpec(validate_config(c), labels, len(specs)))
    return _dedupe(specs)


def _grid_seeds(seeds: Any, base: Mapping[str, Any], max_runs: int | None) -> list[Any]:
    """The grid's seeds: a list as given, an int n as 0..n-1, none as the base config's seed."""
    if seeds is None:
        return [base.get("seed", 0)]
    if isinstance(seeds, (bool, str, bytes)) or not isinstance(seeds, (int, Sequence)):
        raise ValueError(f"grid: seeds must be an int or a list of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"grid: seeds must be >= 1, got {seeds}")
        if max_runs is not None and seeds > max_runs:
            raise _too_many(seeds, f"seeds: {seeds}", max_runs)
        return list(range(seeds))
    return seeds


def _check_run_count(axes: Mapping[str, Any], n_seeds: int, max_runs: int | None) -> None:
    """Refuse more than ``max_runs`` runs, counted before expanding: the product of the axes'
    lengths times the seeds."""
    n_runs = n_seeds
    for v in axes.values():
        n_runs *= len(v) if isinstance(v, (Mapping, Sequence)) and not isinstance(v, str) else 1
    if max_runs is not None and n_runs > max_runs:
        sizes = " x ".join(f"{n} {len(v)}" for n, v in axes.items()
                           if isinstance(v, (Mapping, Sequence)))
        raise _too_many(n_runs, f"{sizes or 'no axes'}, {n_seeds} seed(s)", max_runs)


def _dedupe(specs: list[RunSpec]) -> list[RunSpec]:
    seen: set[str] = set()
    out = []
    for s in specs:
        if s.run_id not in seen:
            seen.add(s.run_id)
            out.append(RunSpec(s.config, s.labels, len(out)))
    return out


def load_grid_file(path: str | os.PathLike[str]) -> Any:
    """Read a grid (or a list of run configs) from a YAML or JSON file, safely.

    ``yaml.safe_load`` (no Python tags), at most :data:`MAX_CONFIG_BYTES` on disk and
    :data:`MAX_CONFIG_VALUES` values once aliases are expanded.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, not UTF-8, malformed YAML (with the line), too large, or empty.
    """
    import yaml

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no sweep config at {p}")
    if p.is_dir():
        raise ValueError(f"{p} is a folder: give the sweep config file (YAML)")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{p}: {size:,} bytes is too large for a sweep config "
                         f"(limit {MAX_CONFIG_BYTES:,})")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not a text (UTF-8) file: {e.reason} at byte {e.start}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if isinstance(e, yaml.constructor.ConstructorError) and "tag" in str(problem):
            problem = f"{problem} (only plain YAML is read: no !!python or other tags)"
        raise ValueError(f"{p}: not a valid sweep config: {problem}{where}") from None
    except RecursionError:
        raise ValueError(f"{p}: nested too deeply to be a sweep config") from None
    if data is None:
        raise ValueError(f"{p}: empty sweep config")
    if not isinstance(data, (Mapping, list)):
        raise ValueError(f"{p}: a grid must be a mapping (base, axes, seeds) or a list of "
                         f"configs, got {type(data).__name__} {str(data)[:40]!r}")
    n = _count_values(data, MAX_CONFIG_VALUES)
    if n > MAX_CONFIG_VALUES:
        raise ValueError(
            f"{p}: expands to more than {MAX_CONFIG_VALUES:,} values once its YAML aliases "
            "(*name) are copied out; refusing it (a sweep config is a few dozen values)")
    return data


def _count_values(data: Any, limit: int) -> int:
    """Values in ``data`` counted as a tree (shared, aliased objects counted at every use),
    stopping as soon as ``limit`` is passed."""
    n, stack = 0, [data]
    while stack:
        v = stack.pop()
        n += 1
        if n > limit:
            return n
        if isinstance(v, Mapping):
            stack.extend(v.values())
            n += len(v)  # the keys
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return n


def group_runs(specs: list[RunSpec], max_size: int | None = None) -> list[list[RunSpec]]:
    """Group runs by architecture (order of first appearance); split groups larger than
    ``max_size`` into consecutive chunks."""
    groups: dict[str, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(s.group, []).append(s)
    out = []
    for g in groups.values():
        if max_size and len(g) > max_size:
            out.extend(g[i : i + max_size] for i in range(0, len(g), max_size))
        else:
            out.append(g)
    return out
