"""The build's job count when --jobs is not given: measured on real tiny and real big images (data/autojobs.py)."""

from __future__ import annotations

import multiprocessing
import time

import cv2
import numpy as np
import pytest
from _images import smooth_image

from resnet_imagenet.data import autojobs as A
from resnet_imagenet.data.autojobs import run_auto
from resnet_imagenet.data.encode import ConvertOptions, work
from resnet_imagenet.data.pool import default_jobs

two_cores = pytest.mark.skipif(default_jobs() < 2, reason="needs 2 cores to have a choice")


def _spin(n: int) -> int:
    return sum(range(n))


def _parallel_speedup() -> float:
    """How much faster two processes do two equal CPU-bound jobs than one process: under a shared
    machine's load it can be ~1, and then no pool can be faster (the choice would rightly be 1)."""
    n = 3_000_000
    t = time.perf_counter()
    _spin(n), _spin(n)
    one = time.perf_counter() - t
    with multiprocessing.get_context().Pool(2) as pool:
        pool.map(_spin, [10, 10])  # started
        t = time.perf_counter()
        pool.map(_spin, [n, n], chunksize=1)
        two = time.perf_counter() - t
    return one / two


def _tasks(tmp_path, hw: tuple[int, int], n: int, opts: ConvertOptions, ext: str) -> list[tuple]:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(4):
        p = tmp_path / f"img{k}{ext}"
        assert cv2.imwrite(str(p), smooth_image(rng, *hw))
        paths.append(str(p))
    return [(f"img{i}{ext}", i % 3, paths[i % 4], opts) for i in range(n)]


@pytest.mark.slow
@two_cores
def test_tiny_images_choice_follows_the_measurement(tmp_path):
    tasks = _tasks(tmp_path, (12, 12), 30000, ConvertOptions(), ".png")
    choice: dict = {}
    got = list(run_auto(work, tasks, probe_s=0.2, choice=choice))
    assert "pool_s" in choice  # decided on a measurement of both, before the tasks ran out
    # a 12x12 decode is about one pool round trip: either may win here, but only by the rule
    assert choice["jobs"] == (default_jobs() if choice["pool_s"] * A.PREFER_POOL < choice["inproc_s"] else 1)
    assert got == [work(t) for t in tasks]


@pytest.mark.slow
@two_cores
@pytest.mark.parametrize("prefer", [1e9, 0.0])
def test_either_outcome_gives_every_result_once_in_order(tmp_path, monkeypatch, prefer):
    """Switching back kills the workers and redoes what they held; keeping the pool goes on with it."""
    monkeypatch.setattr(A, "PREFER_POOL", prefer)  # the rule's margin: force each outcome
    # enough tasks that both trials end on time, not on the tasks running out (a quiet machine is fast)
    tasks = _tasks(tmp_path, (12, 12), 20000, ConvertOptions(), ".png")
    choice: dict = {}
    assert list(run_auto(work, tasks, probe_s=0.05, choice=choice)) == [work(t) for t in tasks]
    assert choice["jobs"] == (1 if prefer else default_jobs())


@pytest.mark.slow
@two_cores
def test_big_images_use_every_core(tmp_path):
    if (s := _parallel_speedup()) < 1.6:
        pytest.skip(f"two processes run only {s:.2f}x one now (the machine is busy): a pool cannot win")
    opts = ConvertOptions(min_dim=256, encoded=True)
    tasks = _tasks(tmp_path, (1200, 1600), 260, opts, ".jpg")
    choice: dict = {}
    got = [r[0] for r in run_auto(work, tasks, probe_s=0.2, choice=choice)]
    assert choice["jobs"] == default_jobs(), choice  # a 1600x1200 decode + resize outweighs the round trip
    assert got == [t[0] for t in tasks]


def test_jobs_given_are_used(tmp_path):
    tasks = _tasks(tmp_path, (8, 8), 40, ConvertOptions(), ".png")
    choice: dict = {}
    assert list(run_auto(work, tasks, 1, choice=choice)) == [work(t) for t in tasks]
    assert choice == {"jobs": 1}
