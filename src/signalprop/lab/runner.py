"""Run studies into a directory and keep everything the report needs next to the results.

Layout of an output directory ``OUT``::

    OUT/index.html                 the report (see :mod:`signalprop.lab.report`)
    OUT/<study>/config.json        the configuration used
    OUT/<study>/results.json       the measurements (``{"config_hash", "data"}``)
    OUT/<study>/conclusion.json    the computed conclusion
    OUT/<study>/figures/*.png      the figures
    OUT/<study>/meta.json          status, timings, environment, error (if any)
    OUT/<study>/cache/, sweep/     resumable parts

A study whose ``results.json`` matches its configuration is not run again (``force`` re-runs it);
inside a study, finished parts are cached, so a run killed half-way resumes.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from signalprop._device import resolve_device
from signalprop._lifeline import shared_worker_pool
from signalprop._registry import check_choice
from signalprop.lab import STUDY_NAMES, get_study
from signalprop.lab.base import Conclusion, config_hash, read_json, write_json
from signalprop.lab.report import build_report

# re-exported: the readers were defined here before the report needed them without the runner
from signalprop.lab.study_dir import is_study_dir as is_study_dir
from signalprop.lab.study_dir import load_study as load_study

EXECUTORS = ("local", "ray")
#: Config keys that say where/how a study runs, not what it measures (excluded from the hash).
RUN_KEYS = ("executor", "device", "workers")


@dataclass
class StudyOutcome:
    """What :func:`run_study` did."""

    name: str
    status: str  # "done" | "cached" | "failed"
    conclusion: Conclusion | None
    figures: list[Path]
    run_s: float
    total_s: float
    error: str | None = None


def environment() -> dict[str, Any]:
    """The software/hardware the measurements were taken on."""
    import numpy as np
    import torch

    import signalprop

    env: dict[str, Any] = {
        "signalprop": signalprop.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return env


# long: 8 documented arguments and the returned outcome take 30 of its lines; the body is ~30
def run_study(
    name: str,
    out: str | Path,
    *,
    quick: bool = False,
    executor: str = "local",
    device: str = "cpu",
    force: bool = False,
    workers: int = 1,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> StudyOutcome:
    """Run one study (or reuse its stored results) and write its conclusion and figures.

    Args:
        name: A registered study name (``ValueError`` listing the valid names otherwise).
        out: The lab's output directory; the study writes into ``out/<name>``.
        quick: Use the study's quick configuration.
        executor: ``"local"`` or ``"ray"`` (passed to sweep-based parts).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        force: Re-run even when stored results match the configuration.
        workers: Worker processes for sweep-based parts (local executor) and for a study's
            independent training cells (:func:`signalprop.lab.base.cached_cells`).
        overrides: Values replacing keys of the configuration (used by tests to shrink it).
        log: Called with one-line progress messages.

    Returns:
        A :class:`StudyOutcome`; a study that raises is recorded as ``failed`` (with the traceback
        in ``meta.json``) instead of stopping the lab.
    """
    check_choice("executor", executor, EXECUTORS)
    mod = get_study(name)
    say = log or (lambda s: None)
    (workdir := Path(out) / name).mkdir(parents=True, exist_ok=True)
    config = study_config(mod, name, quick, overrides)
    dev = device if device != "cpu" else config.get("device", "cpu")
    config.update(device=str(resolve_device(dev)), executor=executor, workers=int(workers))
    h = _results_hash(mod, config)
    write_json(workdir / "config.json", config)
    meta: dict[str, Any] = {
        "name": name, "title": mod.TITLE, "quick": quick, "config_hash": h,
        "environment": environment(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    t0 = time.perf_counter()
    run_s = 0.0
    try:
        data, status, run_s = _measure(mod, name, config, workdir, h, force, quick, say)
        conclusion = mod.conclude(data)
        write_json(workdir / "conclusion.json", conclusion.to_dict())
        t2 = time.perf_counter()
        figs = [Path(p) for p in mod.figures(data, workdir)]
        meta.update(figures_s=time.perf_counter() - t2,
                    figures=[str(p.relative_to(workdir)) for p in figs])
        _write_meta(workdir, meta, status, run_s, t0)
        say(f"{name}: {conclusion.verdict}: {conclusion.sentence}")
        return StudyOutcome(name, status, conclusion, figs, run_s, meta["total_s"])
    except Exception as e:  # a failing study is reported, the lab carries on
        _write_meta(workdir, meta, "failed", run_s, t0, error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc())
        say(f"{name}: FAILED: {type(e).__name__}: {e}")
        return StudyOutcome(name, "failed", None, [], run_s, meta["total_s"], meta["error"])


def _write_meta(workdir: Path, meta: dict[str, Any], status: str, run_s: float, t0: float,
                **extra: Any) -> None:
    """Complete ``meta`` (status, timings, finish time, error) and write ``meta.json``."""
    meta.update(status=status, run_s=run_s, total_s=time.perf_counter() - t0, **extra)
    if status != "failed":
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(workdir / "meta.json", meta)


def study_config(
    mod: ModuleType, name: str, quick: bool, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A study's quick or full configuration with ``overrides`` applied (unknown keys raise
    ``ValueError`` naming them and the valid ones)."""
    config = mod.get_config(quick)
    if overrides:
        unknown = sorted(set(overrides) - set(config))
        if unknown:
            raise ValueError(
                f"unknown config key(s) for study {name!r}: {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(config))}"
            )
        config.update(overrides)
    return config


def _results_hash(mod: ModuleType, config: dict[str, Any]) -> str:
    # where and how it runs does not change the measurements' meaning: keep it out of the hash;
    # a study's VERSION changes when its measurements change meaning (stored results go stale)
    return config_hash({**{k: v for k, v in config.items() if k not in RUN_KEYS},
                        "__version__": getattr(mod, "VERSION", 1)})


def _measure(
    mod: ModuleType, name: str, config: dict[str, Any], workdir: Path, h: str, force: bool,
    quick: bool, say: Callable[[str], None],
) -> tuple[Any, str, float]:
    """The study's measurements: stored ones when they match ``h`` (and not ``force``), else
    a fresh run written to ``results.json``. Returns ``(data, status, run seconds)``."""
    results_path = workdir / "results.json"
    stored = read_json(results_path) if results_path.exists() and not force else None
    if stored is not None and stored.get("config_hash") == h:
        say(f"{name}: results found, not re-running")
        return stored["data"], "cached", float(stored.get("run_s", 0.0))
    say(f"{name}: running ({'quick' if quick else 'full'} configuration)")
    t1 = time.perf_counter()
    data = mod.run(config, workdir)
    run_s = time.perf_counter() - t1
    write_json(results_path, {"config_hash": h, "run_s": run_s, "data": data})
    return read_json(results_path)["data"], "done", run_s  # conclude from what is on disk


def run_lab(
    names: Sequence[str],
    out: str | Path,
    *,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> list[StudyOutcome]:
    """Run several studies (``["all"]`` means every registered one) and build the report.

    ``options`` are :func:`run_study`'s keyword arguments (``quick``, ``executor``, ``device``,
    ``force``, ``workers``), the same for every study.
    """
    unknown = sorted(set(options) - {"quick", "executor", "device", "force", "workers"})
    if unknown:
        raise TypeError(f"run_lab() got unexpected keyword argument(s): {', '.join(unknown)}")
    check_choice("executor", options.get("executor", "local"), EXECUTORS)
    # one pool of workers for every study's parallel parts: they start (and import torch and the
    # data sets) once, not once per study
    with shared_worker_pool(int(options.get("workers", 1))):
        outcomes = [run_study(n, out, log=log, **options) for n in resolve_names(names)]
    build_report(out, order=STUDY_NAMES)
    return outcomes


def resolve_names(names: Sequence[str]) -> list[str]:
    """Expand ``all`` and validate names (unknown ones raise ``ValueError`` with the choices)."""
    if not names:
        raise ValueError(f"name at least one study, or 'all'; studies: {', '.join(STUDY_NAMES)}")
    out: list[str] = []
    for n in names:
        if n == "all":
            out.extend(s for s in STUDY_NAMES if s not in out)
            continue
        get_study(n)  # raises with the valid choices
        if n not in out:
            out.append(n)
    return out


def study_module(name: str) -> ModuleType:
    return get_study(name)


def run_smoke(
    out: str | Path, names: Sequence[str] | None = None, *, force: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[StudyOutcome]:
    """Run studies in their smoke configuration (each module's ``SMOKE`` overrides on top of the
    quick configuration: seconds per study) and build the report; used by the test suite."""
    wanted = resolve_names(list(names) if names else ["all"])
    outcomes = [
        run_study(n, out, quick=True, force=force, overrides=dict(get_study(n).SMOKE), log=log)
        for n in wanted
    ]
    build_report(out, order=STUDY_NAMES)
    return outcomes
