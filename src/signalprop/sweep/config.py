"""The flat run config: one mapping per training run, with defaults and validation.

:data:`SCHEMA` lists every key with its default, its type and (for choice keys) the valid values;
:func:`validate_config` fills in defaults, checks every value and resolves the optimiser-dependent
``null`` defaults (``lr``, ``eps``, ``clip_threshold``), so that a normalised config states every
value a run used. Keys in :data:`PER_RUN` may differ between members of one population; all
other keys define the architecture group (:func:`group_key`). See docs/sweep.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from signalprop._registry import Registry, check_choice, unknown_name_message
from signalprop.data import DATASETS
from signalprop.engine.activations import ACTIVATIONS
from signalprop.engine.optim import OPTIMIZERS
from signalprop.engine.population import CLIP_DEFAULTS, CLIPS, INITS
from signalprop.engine.reference import NORM_POSITIONS, NORMS
from signalprop.vocab.inits import INITS as VOCAB_INITS
from signalprop.vocab.norms import NORMS as VOCAB_NORMS

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Key:
    """One run-config key: default, kind (``int float bool str choice mapping``), choices,
    a bound check, whether ``None`` is allowed, and whether it may vary inside a population."""

    default: Any
    kind: str
    choices: Callable[[], list[str]] | None = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    nullable: bool = False
    per_run: bool = False
    #: For a choice backed by a vocabulary registry: aliases resolve to the canonical name.
    registry: Registry | None = None


def _pos(v: Any) -> bool:
    return v > 0


def _nonneg(v: Any) -> bool:
    return v >= 0


def _unit(v: Any) -> bool:
    return 0 <= v < 1


#: The batched optimisers' hyper-parameter defaults (the vocabulary's; a key shared by several
#: optimisers has one default, checked in tests/vocab), lr and eps apart: those depend on the
#: optimiser and are resolved from ``null`` in :func:`validate_config`.
_HP: dict[str, Any] = {k: v for n in OPTIMIZERS for k, v in OPTIMIZERS.defaults(n).items()
                       if k not in ("lr", "eps")}

SCHEMA: dict[str, Key] = {
    "data": Key("digits", "choice", DATASETS.names),
    "data_args": Key({}, "mapping"),
    "depth": Key(4, "int", check=_pos, rule=">= 1"),
    "width": Key(64, "int", check=_pos, rule=">= 1"),
    "activation": Key("tanh", "choice", ACTIVATIONS.names, registry=ACTIVATIONS),
    "act_scale": Key(1.0, "float", check=_pos, rule="> 0", per_run=True),
    "norm": Key("none", "choice", lambda: list(NORMS), registry=VOCAB_NORMS),
    "norm_position": Key("pre", "choice", lambda: list(NORM_POSITIONS)),
    "norm_affine": Key(True, "bool"),
    "residual": Key(False, "bool"),
    "rbf": Key(0, "int", check=_nonneg, rule=">= 0"),
    "init": Key("lecun", "choice", lambda: list(INITS), per_run=True, registry=VOCAB_INITS),
    "init_scale": Key(1.0, "float", check=_pos, rule="> 0", per_run=True),
    "bias_std": Key(0.0, "float", check=_nonneg, rule=">= 0", per_run=True),
    "optimizer": Key("sgd", "choice", OPTIMIZERS.names),
    "lr": Key(None, "float", check=_pos, rule="> 0", nullable=True, per_run=True),
    "momentum": Key(_HP["momentum"], "float", check=_unit, rule="in [0, 1)", per_run=True),
    "weight_decay": Key(_HP["weight_decay"], "float", check=_nonneg, rule=">= 0", per_run=True),
    "beta1": Key(_HP["beta1"], "float", check=_unit, rule="in [0, 1)", per_run=True),
    "beta2": Key(_HP["beta2"], "float", check=_unit, rule="in [0, 1)", per_run=True),
    "alpha": Key(_HP["alpha"], "float", check=_unit, rule="in [0, 1)", per_run=True),
    "eps": Key(None, "float", check=_nonneg, rule=">= 0", nullable=True, per_run=True),
    "eta_minus": Key(_HP["eta_minus"], "float", check=lambda v: 0 < v < 1, rule="in (0, 1)", per_run=True),
    "eta_plus": Key(_HP["eta_plus"], "float", check=lambda v: v > 1, rule="> 1", per_run=True),
    "step_min": Key(_HP["step_min"], "float", check=_pos, rule="> 0", per_run=True),
    "step_max": Key(_HP["step_max"], "float", check=_pos, rule="> 0", per_run=True),
    "clip": Key("none", "choice", lambda: list(CLIPS)),
    "clip_threshold": Key(None, "float", check=_pos, rule="> 0", nullable=True, per_run=True),
    "steps": Key(200, "int", check=_pos, rule=">= 1"),
    "batch_size": Key(64, "int", check=_pos, rule=">= 1"),
    "seed": Key(0, "int", check=_nonneg, rule=">= 0", per_run=True),
    "record_every": Key(10, "int", check=_nonneg, rule=">= 0"),
    "dtype": Key("float32", "choice", lambda: list(DTYPES)),
    "device": Key("cpu", "str"),
    "tag": Key(None, "str", nullable=True, per_run=True),
}

#: Keys that may differ between the members of one population.
PER_RUN: frozenset[str] = frozenset(k for k, v in SCHEMA.items() if v.per_run)

#: Optimiser hyper-parameter keys (the others are ignored by an optimiser that does not use them).
OPTIMIZER_KEYS = tuple(dict.fromkeys(k for n in OPTIMIZERS for k in OPTIMIZERS.defaults(n)))

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def defaults() -> dict[str, Any]:
    """A fresh copy of every key's default."""
    return {k: copy.deepcopy(v.default) for k, v in SCHEMA.items()}


#: The type a value of each kind (beyond int and float) must have, and how an error names it.
_KIND_TYPES: dict[str, tuple[type, str]] = {
    "bool": (bool, "true or false"),
    "choice": (str, "a string"),
    "str": (str, "a string"),
    "mapping": (Mapping, "a mapping"),
}


def _bad(name: str, what: str, v: Any) -> ValueError:
    return ValueError(f"run config: {name} must be {what}, got {v!r}")


def _coerce(name: str, key: Key, v: Any) -> Any:
    if v is None:
        if key.nullable:
            return None
        raise ValueError(f"run config: {name} must not be null")
    if key.kind in _KIND_TYPES and not isinstance(v, _KIND_TYPES[key.kind][0]):
        raise _bad(name, _KIND_TYPES[key.kind][1], v)
    if key.kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            if not (isinstance(v, float) and v.is_integer()):
                raise _bad(name, "an integer", v)
            v = int(v)
    elif key.kind == "float":
        if isinstance(v, bool):
            raise _bad(name, "a number", v)
        if isinstance(v, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                raise _bad(name, "a number", v) from None
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(name, "a finite number", v)
        v = float(v)
    elif key.kind == "choice":
        assert key.choices is not None
        v = v.lower()
        if key.registry is not None and v in key.registry:
            v = key.registry.canonical(v)
        v = check_choice(name, v, key.choices())
    elif key.kind == "mapping":
        v = json.loads(json.dumps(dict(v), sort_keys=True))  # JSON-able, canonical order
    if key.check is not None and not key.check(v):
        raise _bad(name, key.rule, v)
    return v


def validate_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check a run config and return it normalised (every key present, defaults resolved).

    Raises:
        ValueError: naming an unknown key (with the valid keys), an unknown choice (with the
            valid choices), a value of the wrong type or out of range, or a bad combination.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"a run config must be a mapping, got {type(cfg).__name__}")
    out = defaults()
    for name, v in cfg.items():
        if name not in SCHEMA:
            raise ValueError(unknown_name_message("run-config key", name, sorted(SCHEMA)))
        out[name] = _coerce(name, SCHEMA[name], v)
    if not _DEVICE_RE.match(out["device"]):
        raise ValueError(f"run config: device must be auto, cpu, cuda or cuda:N, got {out['device']!r}")
    opt_defaults = OPTIMIZERS.defaults(out["optimizer"])
    if out["lr"] is None:
        out["lr"] = float(opt_defaults["lr"])
    if out["eps"] is None:
        out["eps"] = float(opt_defaults.get("eps", 1e-8))
    if out["clip_threshold"] is None:
        out["clip_threshold"] = float(CLIP_DEFAULTS[out["clip"]])
    if out["step_min"] > out["step_max"]:
        raise ValueError("run config: step_min must be <= step_max")
    if out["norm"] == "batch" and out["batch_size"] < 2:
        raise ValueError("run config: batch norm needs batch_size >= 2")
    return out


def config_hash(cfg: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """Content hash of a normalised config and its axis labels: the run's id (16 hex chars)."""
    blob = json.dumps({"config": dict(cfg), "labels": dict(labels or {})}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def group_key(cfg: Mapping[str, Any]) -> str:
    """The architecture key: runs with equal keys are trained as one population."""
    shared = {k: v for k, v in cfg.items() if k not in PER_RUN}
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:12]


def optimizer_hparams(cfg: Mapping[str, Any]) -> dict[str, float]:
    """The hyper-parameters of the config's optimiser, by the optimiser's names."""
    names = OPTIMIZERS.defaults(cfg["optimizer"])
    return {k: float(cfg[k]) for k in names}
