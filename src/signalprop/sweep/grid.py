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


def expand_grid(grid: Any) -> list[RunSpec]:
    """Expand a grid into runs (validated; duplicates removed, first occurrence kept).

    Args:
        grid: A mapping with ``base``, ``axes``, ``seeds`` (see docs/sweep.md), a list of run
            configs, or a path to a YAML file holding either.

    Raises:
        ValueError: for an unknown grid key, axis, config key or value (naming valid choices).
    """
    if isinstance(grid, (str, os.PathLike)):
        grid = load_grid_file(grid)
    if isinstance(grid, Sequence) and not isinstance(grid, (str, bytes)):
        specs = [RunSpec(validate_config(c), {}, i) for i, c in enumerate(grid)]
        return _dedupe(specs)
    if not isinstance(grid, Mapping):
        raise ValueError(f"a grid must be a mapping or a list of configs, got {type(grid).__name__}")
    for k in grid:
        if k not in GRID_KEYS:
            raise ValueError(unknown_name_message("grid key", k, list(GRID_KEYS)))
    base = dict(grid.get("base") or {})
    axes = grid.get("axes") or {}
    if not isinstance(axes, Mapping):
        raise ValueError("grid: axes must be a mapping {name: [values]}")
    seeds = grid.get("seeds")
    if seeds is None:
        seeds = [base.get("seed", 0)]
    elif isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)):
        raise ValueError(f"grid: seeds must be an int or a list of ints, got {seeds!r}")
    elif isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"grid: seeds must be >= 1, got {seeds}")
        seeds = list(range(seeds))
    names = list(axes)
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


def _dedupe(specs: list[RunSpec]) -> list[RunSpec]:
    seen: set[str] = set()
    out = []
    for s in specs:
        if s.run_id not in seen:
            seen.add(s.run_id)
            out.append(RunSpec(s.config, s.labels, len(out)))
    return out


def load_grid_file(path: str | os.PathLike[str]) -> Any:
    """Read a grid (or a list of run configs) from a YAML or JSON file."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no sweep config at {p}")
    data = yaml.safe_load(p.read_text(encoding="utf-8"))
    if data is None:
        raise ValueError(f"{p}: empty sweep config")
    return data


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
