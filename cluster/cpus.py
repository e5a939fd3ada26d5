"""Cores of a CPU node: each CPU engine's compute on a core of its own, Forest's other processes off those cores.

A CPU engine (vLLM's CPU build, one compute thread: Ray gives the worker actor one CPU) shares the node's cores with
the search, the workers' front ends and Ray. The scheduler moves them all over every core, so the engine loses
its core for a moment whenever something else runs: on a 2-core VM the engine ran at 0.75-0.84 of its plain rate
under Forest, and at 0.91-0.98 with the engine on one core and everything else on the other (docs/benchmarks.md).
So, when the node has a core to spare: the engine started ``slot``-th on a node takes the node's ``slot``-th core
from the end, and the processes that search (TreeManagers, a searching driver) and the workers' own front ends stay
on the cores no engine took. Linux only; elsewhere nothing is pinned.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def allowed_cores() -> list[int]:
    """The cores this process may run on, in order (empty where the platform cannot say)."""
    getter = getattr(os, "sched_getaffinity", None)
    return sorted(getter(0)) if getter else []


def engine_core(slot: int, engines: int, cores: list[int]) -> int | None:
    """The core of the engine started ``slot``-th of ``engines`` on a node with ``cores``; None when the engines
    would leave no core for the rest."""
    if not 0 <= slot < engines or engines >= len(cores):
        return None
    return cores[-1 - slot]


def spare_cores(engines: int, cores: list[int]) -> list[int] | None:
    """The cores left to Forest's other processes beside ``engines`` pinned engines; None when nothing is pinned
    (no engine, or no core to spare)."""
    if engines <= 0 or engines >= len(cores):
        return None
    return cores[:len(cores) - engines]


def pin(pid: int, cores: list[int]) -> int:
    """Every thread of process ``pid`` onto ``cores`` (threads started later inherit it); how many were pinned.
    A thread that ended meanwhile is skipped; a refusal (no permission) is logged and the rest goes on."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError as exc:
        log.warning("cannot list the threads of process %d (%s); not pinned", pid, exc)
        return 0
    pinned = 0
    for thread in threads:
        try:
            os.sched_setaffinity(int(thread), cores)
            pinned += 1
        except ProcessLookupError:
            continue
        except OSError as exc:
            log.warning("cannot pin thread %s of process %d to cores %s: %s", thread, pid, cores, exc)
    return pinned


def keep_off_engine_cores(engines: int) -> list[int] | None:
    """Pin this process to the cores ``engines`` pinned CPU engines leave; the cores, or None when nothing is
    pinned."""
    cores = spare_cores(engines, allowed_cores())
    if cores is not None:
        pin(os.getpid(), cores)
    return cores


def pin_engine(slot: int, engines: int) -> int | None:
    """In a CPU worker whose engine is up: the engine's processes (this process's descendants) onto the core of
    ``slot``, this process (the worker's front end) onto the spare cores; that core, or None when there is no core
    to spare."""
    import psutil

    core = engine_core(slot, engines, allowed_cores())
    if core is None:
        return None
    for child in psutil.Process().children(recursive=True):
        pin(child.pid, [core])
    keep_off_engine_cores(engines)
    return core
