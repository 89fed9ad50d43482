"""Run a grid: group by architecture, train each group as one population, store the results.

Executors:

- ``local``: groups one after another in this process (``workers=1``), or in ``workers``
  single-threaded processes (one per core is the fastest split for small models on CPU).
- ``ray``: each group is a Ray task (``@ray.remote(num_cpus=1)``, plus ``num_gpus=1`` for a
  population on CUDA, see :func:`ray_resources`); results come back to this
  process, the only one that writes the database. Connects to ``ray_address`` (or
  ``$RAY_ADDRESS``: a cluster started with ``ray start``), else starts a local instance.

Whatever the executor, a group's results are written in one transaction when it finishes, so a
sweep killed at any moment resumes where it stopped (:mod:`signalprop.sweep.store`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from signalprop._device import resolve_device
from signalprop._progress import ProgressBar
from signalprop._registry import check_choice
from signalprop.sweep.config import optimizer_hparams
from signalprop.sweep.grid import MAX_RUNS, RunSpec, expand_grid, group_runs
from signalprop.sweep.result import SweepResult
from signalprop.sweep.store import FINISHED, RunOutcome, Store, encode_record

EXECUTORS = ("local", "ray")

#: A group's work item: [(run_id, normalised config)].
Payload = list[tuple[str, dict[str, Any]]]


@functools.lru_cache(maxsize=8)
def _dataset(name: str, args_json: str):  # noqa: ANN202 - cached per process
    from signalprop.data import load_dataset

    return load_dataset(name, **json.loads(args_json))


def environment(device: str = "cpu") -> dict[str, Any]:
    """Where a run ran: versions, host, threads, device."""
    import signalprop

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "signalprop": signalprop.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return env


def _population(c0: dict[str, Any], cfgs: list[dict[str, Any]], ds: Any) -> Any:
    """The group's initialised :class:`~signalprop.engine.Population` (one member per config)."""
    from signalprop.engine import Arch, Population

    arch = Arch(
        ds.in_features,
        ds.out_features,
        depth=c0["depth"],
        width=c0["width"],
        activation=c0["activation"],
        norm=c0["norm"],
        norm_position=c0["norm_position"],
        norm_affine=c0["norm_affine"],
        residual=c0["residual"],
        rbf=c0["rbf"],
        task="classification" if ds.num_classes else "regression",
    )
    hps = [optimizer_hparams(c) for c in cfgs]
    pop = Population(
        arch,
        len(cfgs),
        optimizer=c0["optimizer"],
        hparams={k: [h[k] for h in hps] for k in hps[0]},
        clip=c0["clip"],
        clip_threshold=[c["clip_threshold"] for c in cfgs],
        act_scale=[c["act_scale"] for c in cfgs],
        dtype=getattr(torch, c0["dtype"]),
        device=c0["device"],
    )
    pop.init_(
        [c["seed"] for c in cfgs],
        init=[c["init"] for c in cfgs],
        init_scale=[c["init_scale"] for c in cfgs],
        bias_std=[c["bias_std"] for c in cfgs],
        data_x=ds.x_train,
    )
    return pop


def _outcomes(payload: Payload, res: Any, env: dict[str, Any]) -> list[RunOutcome]:
    """One :class:`RunOutcome` per run of a trained population (wall time shared equally)."""
    cfgs = [c for _, c in payload]
    per = res.wall_time / len(cfgs)
    out = []
    for k, (rid, cfg) in enumerate(payload):
        rec = res.records[k]
        rec.meta.update({"run_id": rid, "config": cfg})
        metrics = dict(res.final[k])
        metrics["population_size"] = len(cfgs)
        metrics["population_wall_time"] = res.wall_time
        out.append(RunOutcome(
            rid, "diverged" if res.diverged_step[k] is not None else "done", metrics,
            encode_record(rec), per, env,
        ))
    return out


def run_group(payload: Payload, callback: Callable[[int], None] | None = None) -> list[RunOutcome]:
    """Train one architecture group as a population and return one result per run.

    Never raises for a training error: the runs are returned as ``failed`` with the error, so
    that remote executors always hand back a result.

    Args:
        payload: ``[(run_id, config)]`` with normalised configs sharing a :func:`group_key`.
        callback: Progress, called with the number of steps done.

    Returns:
        One :class:`~signalprop.sweep.store.RunOutcome` per run, in the payload's order.
    """
    cfgs = [c for _, c in payload]
    c0 = dict(cfgs[0])
    if c0["device"] == "auto":  # resolved where the group runs (the config, its hash, stay put)
        c0["device"] = str(resolve_device("auto"))
    env = environment(c0["device"])
    try:
        resolve_device(c0["device"])  # an unknown or absent device fails this group, clearly
        ds = _dataset(c0["data"], json.dumps(c0["data_args"], sort_keys=True))
        pop = _population(c0, cfgs, ds)
        seeds = [c["seed"] for c in cfgs]
        res = pop.fit(
            ds, c0["steps"], c0["batch_size"], seeds, c0["record_every"], callback=callback
        )
    except Exception as e:  # a bad group must not take the sweep down
        err = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
        return [RunOutcome.failed(r, err, env) for r, _ in payload]
    return _outcomes(payload, res, env)


def _pool_task(payload: Payload) -> list[RunOutcome]:
    torch.set_num_threads(1)  # one single-threaded worker per core is the fastest split
    return run_group(payload)


def default_out(specs: list[RunSpec]) -> Path:
    """``sweeps/<hash of the run ids>``: the same grid resumes in the same place."""
    h = hashlib.sha256("".join(s.run_id for s in specs).encode()).hexdigest()[:10]
    return Path("sweeps") / h


class _Progress(ProgressBar):
    """The sweep's bar: a "groups" and a "steps" line (or nothing)."""

    def __init__(self, enabled: bool, n_groups: int, n_steps: int) -> None:
        super().__init__({"groups": n_groups, "steps": n_steps}, enabled=enabled and n_groups > 0)

    def steps(self, n: int) -> None:
        self.advance("steps", n)

    def group_done(self) -> None:
        self.advance("groups", 1)


def sweep(
    grid: Any,
    out: str | os.PathLike[str] | None = None,
    executor: str = "local",
    progress: bool = True,
    *,
    workers: int = 1,
    max_group_size: int | None = None,
    ray_address: str | None = None,
    ray_init: dict[str, Any] | None = None,
    max_runs: int | None = MAX_RUNS,
) -> SweepResult:
    """Run every point of a grid; resume if ``out`` already holds some of them.

    Args:
        grid: A grid mapping (``base``, ``axes``, ``seeds``), a list of run configs, or a path
            to a YAML file with either (docs/sweep.md).
        out: The sweep directory (``DIR/sweep.db``); default ``sweeps/<hash of the grid>``.
        executor: ``local`` or ``ray``.
        progress: Show a progress bar over groups and steps.
        workers: ``local``: number of single-threaded worker processes (1: in this process).
        max_group_size: Split populations larger than this (default: no limit; with several
            workers, groups are split so that every worker has work).
        ray_address: Ray cluster address (default ``$RAY_ADDRESS`` or a new local instance).
        ray_init: Extra keyword arguments of ``ray.init`` for a local instance.
        max_runs: Refuse grids of more runs than this (counted before expanding; ``None``: no
            limit).

    Returns:
        A :class:`SweepResult` over the grid's runs.
    """
    check_choice("executor", executor, EXECUTORS)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    specs = expand_grid(grid, max_runs=max_runs)
    if not specs:
        raise ValueError("the grid has no runs")
    out = Path(out) if out is not None else default_out(specs)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out), Store(out) as store:
        todo = _unfinished(store, specs, grid)
        n_par = workers if executor == "local" else 0
        groups = group_runs(todo, _group_cap(todo, executor, workers, max_group_size))
        bar = _Progress(progress, len(groups), sum(g[0].config["steps"] for g in groups))
        try:
            if executor == "ray":
                _run_ray(store, groups, bar, ray_address, ray_init or {})
            elif n_par > 1:
                _run_pool(store, groups, bar, workers)
            else:
                _run_local(store, groups, bar)
        finally:
            bar.close()
    return SweepResult(out, [s.run_id for s in specs])


def _unfinished(store: Store, specs: list[RunSpec], grid: Any) -> list[RunSpec]:
    """Registers the runs (killed or failed ones go back to pending) and returns those not
    finished yet."""
    store.add_runs((s.run_id, s.index, s.group, s.config, s.labels) for s in specs)
    store.reset_unfinished()
    store.set_meta("last_grid", json.dumps(grid if not isinstance(grid, os.PathLike)
                                           else str(grid), default=str))
    status = store.statuses([s.run_id for s in specs])
    return [s for s in specs if status.get(s.run_id) not in FINISHED]


def _group_cap(todo: list[RunSpec], executor: str, workers: int, cap: int | None) -> int | None:
    """The largest population: ``cap`` if given; with fewer groups than local workers, small
    enough that every worker gets a share of the populations."""
    if executor == "local" and workers > 1 and cap is None:
        n_groups = len(group_runs(todo))
        if 0 < n_groups < workers:
            biggest = max(len(g) for g in group_runs(todo))
            cap = max(1, math.ceil(biggest / math.ceil(workers / n_groups)))
    return cap


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One sweep process per directory: it alone may reset runs left ``running``. The lock
    (``flock`` on ``DIR/.lock``) dies with its process, so a killed sweep leaves none behind."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another sweep is running on {out} (one process per sweep directory)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _payload(group: list[RunSpec]) -> Payload:
    return [(s.run_id, s.config) for s in group]


def _run_local(store: Store, groups: list[list[RunSpec]], bar: _Progress) -> None:
    for g in groups:
        store.mark_running([s.run_id for s in g])
        done = [0]

        def cb(n: int, done: list[int] = done) -> None:
            bar.steps(n - done[0])
            done[0] = n

        store.finish(run_group(_payload(g), callback=cb))
        bar.group_done()


def _run_pool(store: Store, groups: list[list[RunSpec]], bar: _Progress, workers: int) -> None:
    from concurrent.futures import as_completed

    from signalprop._lifeline import worker_pool

    # Ctrl-C (or an error here) stops the workers at once: finished groups are stored, the rest
    # resume next time
    with worker_pool(workers) as pool:
        futs = {}
        for g in groups:
            store.mark_running([s.run_id for s in g])
            futs[pool.submit(_pool_task, _payload(g))] = g
        for f in as_completed(futs):
            store.finish(f.result())
            bar.steps(futs[f][0].config["steps"])
            bar.group_done()


def _run_ray(
    store: Store,
    groups: list[list[RunSpec]],
    bar: _Progress,
    address: str | None,
    init_kwargs: dict[str, Any],
) -> None:
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "executor='ray' needs Ray: pip install 'signalprop[ray]' (or pip install ray)"
        ) from e
    started_here = False
    reaper = None
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **init_kwargs)
        else:
            kw = {"include_dashboard": False, "log_to_driver": False}
            kw.update(init_kwargs)
            # a local instance's agents outlive a kill -9 of this process: a sidecar reaps them
            from signalprop._lifeline import start_reaper

            reaper = start_reaper()
            ray.init(**kw)
        started_here = True
    try:
        remote = ray.remote(num_cpus=1)(_ray_task)
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        pending = {}
        for g in groups:
            store.mark_running([s.run_id for s in g])
            pending[remote.options(**ray_resources(g, cluster_gpus)).remote(_payload(g))] = g
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                g = pending.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as e:  # the task itself died (worker lost ...)
                    results = [RunOutcome.failed(s.run_id, f"ray task failed: {e}") for s in g]
                store.finish(results)
                bar.steps(g[0].config["steps"])
                bar.group_done()
    finally:
        if started_here:
            ray.shutdown()
        if reaper is not None:
            reaper.terminate()
            reaper.wait()


def ray_resources(group: list[RunSpec], cluster_gpus: float = 0.0) -> dict[str, float]:
    """Ray resources of one population: a CPU, plus a GPU when it trains on CUDA (``cuda``,
    ``cuda:N``, or ``auto`` on a cluster that has GPUs), so that Ray places it on a GPU and
    sets ``CUDA_VISIBLE_DEVICES`` for it."""
    device = str(group[0].config.get("device", "cpu"))
    wants = device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)
    return {"num_cpus": 1, "num_gpus": 1 if wants else 0}


def _ray_task(payload: Payload) -> list[RunOutcome]:
    torch.set_num_threads(1)
    try:
        import ray

        gpus = ray.get_gpu_ids()
    except Exception:  # not inside a Ray worker (tests call the task directly)
        gpus = []
    if gpus:
        # Ray made only the assigned GPU visible: it is cuda:0 in this process
        payload = [(rid, {**cfg, "device": "cuda"} if str(cfg.get("device", "")).startswith(
            ("cuda", "auto")) else cfg) for rid, cfg in payload]
    return run_group(payload)
