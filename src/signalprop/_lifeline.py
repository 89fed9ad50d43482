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
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

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
