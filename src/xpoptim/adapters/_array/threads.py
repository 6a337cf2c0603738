"""Chunk sizes and the thread pools that share a NumPy bucket's chunks between threads."""

from __future__ import annotations

import os
from typing import Any

#: Elements per chunk on NumPy with one thread (256 KiB of float32: a few buffers stay in L2).
DEFAULT_CHUNK_SIZE = 65536
#: Elements per chunk on NumPy with several threads: larger chunks, so that each thread spends most of its time
#: inside NumPy's loops (GIL released) rather than in the rule's Python (GIL held). Measured on 2 cores, 16M
#: float32 parameters: Adam 36 -> 25 ms with 2 threads at this size, but 41 ms with 2 threads at 65536.
DEFAULT_THREADED_CHUNK_SIZE = 262144
#: ``threads=None`` uses this many threads at most (or fewer, when fewer cores are available to the process).
MAX_AUTO_THREADS = 2
#: NumPy, compiled step (:mod:`._cfuse`), several threads: elements per task.
COMPILED_TASK_SIZE = 1 << 22


def _auto_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_THREADS, cores))


_POOLS: dict = {}
if hasattr(os, "register_at_fork"):
    # A forked child inherits the pools but not their threads: a task sent to one would never run. The child
    # starts its own pools instead.
    os.register_at_fork(after_in_child=_POOLS.clear)



def _call(task: tuple) -> Any:
    fn, args = task
    return fn(*args)


def _call_all(tasks: list) -> None:
    for fn, args in tasks:
        fn(*args)


def _grouped(tasks: list, sizes: list[int], target: int) -> list:
    """Consecutive tasks joined into tasks of at least ``target`` elements (the last one may be smaller)."""
    out: list = []
    group: list = []
    total = 0
    for task, n in zip(tasks, sizes):
        group.append(task)
        total += n
        if total >= target:
            out.append((_call_all, (group,)))
            group, total = [], 0
    if group:
        out.append((_call_all, (group,)))
    return out


def _pool(n: int) -> Any:
    if n not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="xpoptim-array")
    return _POOLS[n]

