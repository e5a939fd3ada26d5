"""``cluster.cpus``: which core each CPU engine takes, and pinning a process's threads (Linux)."""

import os
import threading

from actors.pool import Pool
from cluster.config import ForestConfig
from cluster.cpus import allowed_cores, engine_core, keep_off_engine_cores, pin, spare_cores


def test_engines_take_the_last_cores_and_the_rest_keep_the_first():
    assert engine_core(0, 1, [0, 1]) == 1 and spare_cores(1, [0, 1]) == [0]
    assert [engine_core(slot, 2, [0, 1, 2, 3]) for slot in (0, 1)] == [3, 2] and spare_cores(2, [0, 1, 2, 3]) == [0, 1]
    assert engine_core(0, 2, [4, 6]) is None and spare_cores(2, [4, 6]) is None  # no core left for the rest
    assert engine_core(2, 2, [0, 1, 2, 3]) is None  # a slot beyond the engines
    assert spare_cores(0, [0, 1]) is None and keep_off_engine_cores(0) is None  # nothing pinned, nothing moves


def _thread_cores(pid: int) -> set[frozenset]:
    """The core sets of the process's threads (a thread that ends meanwhile is left out)."""
    cores = set()
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            cores.add(frozenset(os.sched_getaffinity(int(thread))))
        except ProcessLookupError:
            continue
    return cores


def test_pin_moves_every_thread_and_threads_started_later_follow():
    cores = allowed_cores()
    started = threading.Event()
    stop = threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), stop.wait()), daemon=True)
    worker.start()
    started.wait()
    try:
        assert pin(os.getpid(), cores[:1]) >= 2  # this thread and the one above
        assert _thread_cores(os.getpid()) == {frozenset(cores[:1])}
        late = threading.Thread(target=lambda: None)
        late.start()
        late.join()
        assert os.sched_getaffinity(0) == set(cores[:1])
    finally:
        pin(os.getpid(), cores)
        stop.set()
    assert _thread_cores(os.getpid()) == {frozenset(cores)}


def test_a_pool_searches_off_the_engine_cores_until_it_closes():
    cores = allowed_cores()
    pool = Pool(ForestConfig(), workers=[], cpu_engines=1)
    pool.worker_pool()
    try:
        expected = cores[:-1] if len(cores) > 1 else cores  # a single core: nothing to keep off
        assert os.sched_getaffinity(0) == set(expected)
        pool.worker_pool()  # a second event loop's pool: the cores to restore are still the first ones
    finally:
        pool.unpin()
    assert os.sched_getaffinity(0) == set(cores)
