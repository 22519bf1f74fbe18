"""The converter's process pool: ``map`` over image tasks on N processes, results in input order.

Decoding and resizing dominate convert_imageset; they run here, while one process writes the
LMDB in list order (data/convert.py), as Caffe's single-threaded tool writes it.
"""

from __future__ import annotations

import collections
import functools
import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator


def default_jobs() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_chunk(fn: Callable, chunk: list) -> list:
    return [fn(t) for t in chunk]


def run_ordered(fn: Callable, tasks: Iterable, jobs: int, chunk: int = 16, window: int = 4) -> Iterator:
    """``map(fn, tasks)`` on ``jobs`` processes, in order, reading at most jobs*window*chunk tasks ahead.

    Tasks travel in chunks: one round trip per image cost more than the decode it carried
    (1.28x on 2 cores for the encoded min_dim-256 build, 1.8x with chunks of 16).
    """
    if jobs <= 1:
        yield from map(fn, tasks)
        return
    it = iter(tasks)
    chunks = iter(lambda: list(itertools.islice(it, chunk)), [])
    work_chunk = functools.partial(_run_chunk, fn)
    with multiprocessing.get_context().Pool(jobs) as pool:
        pending = collections.deque(pool.apply_async(work_chunk, (c,)) for c in itertools.islice(chunks, jobs * window))
        while pending:
            results = pending.popleft().get()
            c = next(chunks, None)
            if c is not None:
                pending.append(pool.apply_async(work_chunk, (c,)))
            yield from results
