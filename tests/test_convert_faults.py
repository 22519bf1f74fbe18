"""convert_imageset interrupted by real signals: Ctrl-C (SIGINT to the process group) and SIGTERM (kill PID)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _images import smooth_image, write_images

REPO = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError):
            pass
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """8 small JPEGs listed 200,000 times: a build of a few seconds with small records (40,000 took 0.8 s)."""
    tmp = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    names = write_images(tmp / "root", [smooth_image(rng, 24, 24) for _ in range(8)], ".jpg")
    listfile = tmp / "list.txt"
    listfile.write_text("".join(f"{names[i % 8]} {i % 8}\n" for i in range(200000)))
    return tmp / "root", listfile


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_convert_exits_at_once_and_leaves_nothing(images, tmp_path, sig, code):
    root, listfile = images
    for attempt in range(3):  # the Pool.terminate deadlock struck 3 tries of 4: repeat
        db = tmp_path / f"db{attempt}"
        cmd = [sys.executable, "-m", "resnet_imagenet", "convert_imageset", "--no-progress", "--jobs", "2",
               str(root), str(listfile), str(db)]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not any(p.name.startswith(f".{db.name}.tmp-") for p in tmp_path.iterdir()):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.02)
            while len(workers := children(proc.pid)) < 2:  # the pool starts after the list is read (slow under load)
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.02)
            time.sleep(0.2 + 0.1 * attempt)  # records are being written
            assert proc.poll() is None
            t0 = time.monotonic()
            if sig == signal.SIGINT:
                os.killpg(proc.pid, sig)  # a terminal's Ctrl-C reaches the workers too
            else:
                proc.send_signal(sig)  # kill PID: the parent only
            assert proc.wait(timeout=10) == code
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        err = proc.stderr.read().strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(f"resnet-imagenet convert_imageset: interrupted by {sig.name}: {db} not written ("), (
            err
        )
        assert took < 5, took
        assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
        time.sleep(0.2)
        assert not [p for p in workers if alive(p)], "decode workers left running"


@pytest.mark.slow
def test_kill9_of_convert_stops_its_workers(images, tmp_path):
    """A SIGKILLed parent cannot clean up; its workers notice it is gone and exit (the temporary stays)."""
    root, listfile = images
    cmd = [sys.executable, "-m", "resnet_imagenet", "convert_imageset", "--no-progress", "--jobs", "2",
           str(root), str(listfile), str(tmp_path / "db")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(children(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)
        workers = children(proc.pid)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in workers)
    finally:
        for p in children(proc.pid):
            os.kill(p, signal.SIGKILL)


def test_class_list_lives_inside_the_db_and_wins_over_a_stray_sidecar(tmp_path, caplog):
    from resnet_imagenet.data.convert import convert_imageset
    from resnet_imagenet.data.db import read_classes
    from resnet_imagenet.tools.classify import load_labels

    rng = np.random.default_rng(1)
    for c in ("cat", "dog"):
        write_images(tmp_path / "root" / c, [smooth_image(rng, 8, 8)])
    convert_imageset(tmp_path / "root", None, tmp_path / "db", jobs=1, progress=False)
    assert (tmp_path / "db" / "classes.txt").read_text() == "cat\ndog\n"  # renamed into place with the records
    assert (tmp_path / "db.classes.txt").read_text() == "cat\ndog\n"  # still written, for existing scripts
    assert read_classes(tmp_path / "db") == ["cat", "dog"]
    (tmp_path / "db.classes.txt").write_text("ant\nbee\n")  # another run's list, renamed in between
    assert read_classes(tmp_path / "db") == ["cat", "dog"] and "another build" in caplog.text
    assert load_labels(tmp_path / "db", 2) == ["cat", "dog"]
    (tmp_path / "db" / "classes.txt").unlink()  # a DB built before the class list moved inside
    assert read_classes(tmp_path / "db") == ["ant", "bee"]
