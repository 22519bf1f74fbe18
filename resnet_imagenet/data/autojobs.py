"""How many decode processes a build uses when ``--jobs`` is not given: measured on the build's first images.

A pool pays per image for pickling the task and the Datum both ways and for the queues; for small or
pre-resized images that costs more than the decode itself (issue 15: all cores were 1.8x slower than
one process), for ImageNet's originals the decode dominates and the pool scales with the cores. So the
build first runs in-process and times it, then runs the pool and times that (after every worker has
delivered, so the start-up is left out), and goes on with the faster: one process unless the pool is
clearly ahead (PREFER_POOL). Both timings include what the caller does with each result (the LMDB
writes), as the build itself does. Results come in input order either way, and no task is done twice.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from resnet_imagenet.data.pool import default_jobs, run_ordered

log = logging.getLogger(__name__)

PREFER_POOL = 1.15  # the pool must be this much faster to be kept (it holds N processes' memory)
CHUNK = 16  # tasks per pool round trip (run_ordered's default)


def run_auto(
    fn: Callable, tasks: Iterable, jobs: int | None = None, *, probe_s: float = 1.0, choice: dict | None = None
) -> Iterator:
    """``map(fn, tasks)`` in order, on ``jobs`` processes, or (None) on as many as measured to be faster.

    ``probe_s``: the least time each of the two trials runs; ``choice`` (a dict) receives ``jobs`` and the
    measured seconds per item in-process and in the pool.
    """
    choice = choice if choice is not None else {}
    cores = default_jobs()
    if jobs is not None or cores <= 1:
        choice["jobs"] = jobs or cores
        yield from run_ordered(fn, tasks, jobs or cores)
        return
    it = iter(tasks)
    t0, n1 = time.perf_counter(), 0
    for task in it:  # trial 1: in-process
        yield fn(task)
        n1 += 1
        if n1 >= CHUNK and time.perf_counter() - t0 >= probe_s:
            break
    else:
        choice["jobs"] = 1  # done before the trial ended
        return
    choice["inproc_s"] = (time.perf_counter() - t0) / n1
    yield from _trial_pool(fn, it, cores, probe_s, choice)


def _trial_pool(fn: Callable, it: Iterator, cores: int, probe_s: float, choice: dict) -> Iterator:
    pulled: collections.deque = collections.deque()  # sent to the pool, result not yet out

    def feed() -> Iterator:
        for task in it:
            pulled.append(task)
            yield task

    pool = run_ordered(fn, feed(), cores, chunk=CHUNK)
    try:
        warm, t1, n2 = cores * CHUNK, 0.0, 0
        for r in pool:
            pulled.popleft()
            yield r
            n2 += 1
            if n2 == warm:
                t1 = time.perf_counter()
            elif n2 >= warm + 4 * CHUNK * cores and time.perf_counter() - t1 >= probe_s:
                break
        else:
            choice["jobs"] = cores
            return
        choice["pool_s"] = (time.perf_counter() - t1) / (n2 - warm)
        keep = choice["pool_s"] * PREFER_POOL < choice["inproc_s"]
        choice["jobs"] = cores if keep else 1
        log.info(
            "--jobs %d: %.2f ms/image in one process, %.2f ms in a pool of %d (timed over %d pool images)",
            choice["jobs"], 1e3 * choice["inproc_s"], 1e3 * choice["pool_s"], cores, n2,
        )  # fmt: skip
        if keep:
            yield from pool
            return
    finally:
        pool.close()  # the workers are killed (also when our consumer stops); what they held is redone below
    yield from map(fn, list(pulled))
    yield from map(fn, it)
