"""Worker processes die with their parent.

A ``kill -9`` of ``signalprop sweep --workers N`` (or ``lab run``) gives the parent no chance to
stop its workers; without this they kept training, orphaned under PID 1, for minutes (and the
multiprocessing resource tracker with them, since the workers hold its pipe open). Two layers:

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (through ctypes), so the kernel kills the worker
  the moment its parent dies;
- everywhere: a daemon thread polling ``os.getppid()``, which changes when the parent dies and the
  worker is re-parented (to PID 1 or a sub-reaper). It also covers the window before the prctl
  call and the case where the thread that spawned the worker exits before the process does
  (PDEATHSIG follows the parent *thread*).

Processes we do not start ourselves (a local Ray instance's raylet, dashboard and runtime-env
agents) get a reaper instead: a small sidecar process (:func:`start_reaper`) that keeps a list of
the parent's descendants and kills them when the parent dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

#: How often the watchdog looks at its parent (seconds).
POLL_SECONDS = 0.5

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the Linux kernel to send ``sig`` to this process when its parent dies.

    Returns:
        Whether it was set (``False`` off Linux or when prctl is unavailable).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int, poll: float) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # no clean-up: the parent, who would want the results, is gone
        time.sleep(poll)


def die_with_parent(parent_pid: int, poll: float = POLL_SECONDS) -> None:
    """Make this (worker) process exit when ``parent_pid`` dies: parent-death signal plus a
    watchdog thread. Exits at once when the parent is already gone."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid, poll), daemon=True,
                     name="signalprop-lifeline").start()


#: The pool :func:`shared_worker_pool` lends: ``{"workers": n, "pool": executor or None}``.
_SHARED: dict[str, Any] = {}


def _new_pool(workers: int) -> Any:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawned, not forked: no fork of a process that holds torch threads or a sqlite connection
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


def _stop(pool: Any) -> None:
    """Terminate the pool's workers now (instead of waiting for their tasks) and shut it down."""
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    pool.shutdown(wait=True)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Any]:
    """A ``concurrent.futures.ProcessPoolExecutor`` of ``workers`` processes that die with this
    one: the one worker pool of the package (the sweep's populations, the lab's cells).

    Workers are spawned and arm :func:`die_with_parent` in their initializer, which lives in
    this module (standard library only), so a ``kill -9`` of the parent stops them within a
    fraction of a second. An exception or Ctrl-C inside the block terminates the workers at once
    instead of waiting for their tasks to finish. Inside :func:`shared_worker_pool` (of at least
    ``workers`` processes) the shared pool is lent instead of starting a new one.
    """
    if 0 < workers <= _SHARED.get("workers", 0):
        pool = _SHARED.get("pool")
        if pool is None or getattr(pool, "_broken", False):
            pool = _SHARED["pool"] = _new_pool(_SHARED["workers"])
        try:
            yield pool
        except BaseException:
            _SHARED["pool"] = None  # the next borrower starts a fresh one
            _stop(pool)
            raise
        return
    pool = _new_pool(workers)
    try:
        yield pool
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def shared_worker_pool(workers: int) -> Iterator[None]:
    """Inside the block, :func:`worker_pool` lends one pool of ``workers`` processes, started on
    first use and kept between uses, so that a run of many parts (the lab's studies) pays for
    starting workers and their imports (torch, the data sets) once. Nested: the outer one."""
    if _SHARED or workers < 2:
        yield
        return
    _SHARED.update(workers=int(workers), pool=None)
    try:
        yield
    finally:
        pool = _SHARED.get("pool")
        _SHARED.clear()
        if pool is not None:
            pool.shutdown(wait=True)


# --- a reaper for process trees we do not start ourselves (Ray) -----------------------------------
def _proc_table() -> dict[int, tuple[int, str]]:
    """``{pid: (ppid, start time)}`` of every process (Linux ``/proc``)."""
    out: dict[int, tuple[int, str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read().decode("ascii", "replace")
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        rest = raw[raw.rfind(")") + 2:].split()
        if len(rest) > 19:
            out[int(d)] = (int(rest[1]), rest[19])  # ppid, starttime
    return out


def descendants(pid: int, table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """``{pid: start time}`` of every descendant of ``pid`` (Linux; ``{}`` elsewhere)."""
    if not os.path.isdir("/proc"):
        return {}
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        children.setdefault(pp, []).append(p)
    out: dict[int, str] = {}
    stack = list(children.get(pid, []))
    while stack:
        p = stack.pop()
        if p in out:
            continue
        out[p] = table[p][1]
        stack.extend(children.get(p, []))
    return out


def _reap(parent_pid: int, poll: float) -> None:
    """Sidecar main loop: remember the parent's descendants; when the parent dies, kill the
    ones still running (matched by start time, so a recycled pid is never hit)."""
    me = os.getpid()
    known: dict[int, str] = {}
    while os.getppid() == parent_pid:
        known.update(descendants(parent_pid))
        known.pop(me, None)
        time.sleep(poll)
    table = _proc_table()
    for pid, start in known.items():
        if pid != me and pid in table and table[pid][1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def start_reaper(poll: float = POLL_SECONDS) -> Any:
    """Start a sidecar that kills this process's descendants if this process dies without
    cleaning up (``kill -9``): for process trees started by libraries, such as a local Ray
    instance, whose agents otherwise outlive their driver. Stop it with ``.terminate()`` after
    a normal shutdown. Returns the ``subprocess.Popen`` (``None`` off Linux)."""
    import subprocess

    if not sys.platform.startswith("linux"):
        return None
    code = f"from signalprop._lifeline import _reap; _reap({os.getpid()}, {float(poll)!r})"
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            close_fds=True)
