"""The converter's process pool: ``map`` over image tasks on N processes, results in input order.

Decoding and resizing dominate convert_imageset; they run here, while one process writes the
LMDB in list order (data/convert.py), as Caffe's single-threaded tool writes it.

Our own few lines rather than multiprocessing.Pool, whose terminate() can deadlock when its workers
die of a Ctrl-C in the middle of a task (3 of 4 tries in issue 16). Here the workers ignore SIGINT
(the terminal sends it to the whole process group; the parent decides), the parent kills them with
SIGKILL on any exception (Ctrl-C, SIGTERM through util.interrupt, an error) and never waits on a queue
for them; a worker whose parent died (kill -9) notices within a second and exits; a worker that dies
(out of memory) fails the build with one line instead of hanging it.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import connection

POLL_S = 1.0  # how often a waiting worker checks its parent, and the parent its workers


def default_jobs() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class WorkerDied(RuntimeError, ValueError):
    """A decode process died (killed, out of memory): the build fails in one line (a ValueError for the cli)."""


def _worker(fn: Callable, tasks, pipes: list, me: int, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for i, (reader, writer) in enumerate(pipes):  # keep only our own write end: see run_ordered
        reader.close()
        if i != me:
            writer.close()
    out = pipes[me][1]
    while True:
        if os.getppid() != parent:  # the parent was killed (-9): nobody reads our results
            return
        try:
            item = tasks.get(timeout=POLL_S)
        except queue.Empty:
            continue
        if item is None:
            return
        idx, chunk = item
        try:
            out.send((idx, [fn(t) for t in chunk]))
        except OSError:  # the parent is gone (EPIPE)
            return


def run_ordered(fn: Callable, tasks: Iterable, jobs: int, chunk: int = 16, window: int = 4) -> Iterator:
    """``map(fn, tasks)`` on ``jobs`` processes, in order, reading at most jobs*window*chunk tasks ahead.

    Tasks travel in chunks: one round trip per image cost more than the decode it carried
    (1.28x on 2 cores for the encoded min_dim-256 build, 1.8x with chunks of 16).
    Each worker sends its results through its own pipe, of which it holds the only write end: a worker
    killed in the middle of a message (a chunk of 256-px records is megabytes, many pipe buffers) is an
    end of file there, where a shared queue would leave the parent waiting for the rest of the message forever.
    """
    if jobs <= 1:
        yield from map(fn, tasks)
        return
    it = iter(tasks)
    chunks = enumerate(iter(lambda: list(itertools.islice(it, chunk)), []))
    ctx = multiprocessing.get_context()
    task_q = ctx.Queue()
    pipes = [ctx.Pipe(duplex=False) for _ in range(jobs)]
    procs = [ctx.Process(target=_worker, args=(fn, task_q, pipes, i, os.getpid()), daemon=True) for i in range(jobs)]
    readers = [r for r, _ in pipes]
    clean = False
    try:
        for p in procs:
            p.start()
        for _, w in pipes:
            w.close()
        sent = 0
        for c in itertools.islice(chunks, jobs * window):
            task_q.put(c)
            sent += 1
        done: dict[int, list] = {}
        for want in itertools.count():
            if want == sent:
                break
            while want not in done:
                done.update(_get(readers, procs))
            c = next(chunks, None)
            if c is not None:
                task_q.put(c)
                sent += 1
            yield from done.pop(want)
        for _ in procs:
            task_q.put(None)
        for p in procs:
            p.join()
        clean = True
    finally:
        if not clean:
            for p in procs:
                if p.pid is not None:
                    p.kill()
            for p in procs:
                if p.pid is not None:
                    p.join(timeout=5)
            task_q.cancel_join_thread()  # never block at exit on data nobody will read
        task_q.close()
        for r in readers:
            r.close()


def _get(readers: list, procs: list) -> list[tuple[int, list]]:
    """The chunks finished now; a worker that died (killed, out of memory) is an error, not a hang."""
    ready = connection.wait(readers + [p.sentinel for p in procs], timeout=POLL_S)
    out = []
    for r in ready:
        if r in readers:
            w = procs[readers.index(r)]
            try:
                out.append(r.recv())
                continue
            except (EOFError, OSError):  # its pipe closed, maybe in the middle of a message
                w.join(timeout=POLL_S)
        else:
            w = next(p for p in procs if p.sentinel == r)
            w.join(timeout=POLL_S)
        code = w.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
        raise WorkerDied(f"a decode worker (pid {w.pid}) {how} (out of memory?)")
    return out
