"""A decode worker killed under convert_imageset (issue 13 case 6) and a disk that fills during a build (case 7)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _images import smooth_image, write_images
from test_convert_faults import alive, children

from resnet_imagenet.data.pool import WorkerDied, run_ordered

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """8 small JPEGs listed 40,000 times: a build of several seconds."""
    tmp = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    names = write_images(tmp / "root", [smooth_image(rng, 24, 24) for _ in range(8)], ".jpg")
    listfile = tmp / "list.txt"
    listfile.write_text("".join(f"{names[i % 8]} {i % 8}\n" for i in range(40000)))
    return tmp / "root", listfile


@pytest.mark.slow
def test_a_killed_decode_worker_fails_the_build_in_one_line(images, tmp_path):
    root, listfile = images
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "resnet_imagenet", "convert_imageset", "--no-progress", "--jobs", "2",
           str(root), str(listfile), str(db)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".db.tmp-") for p in tmp_path.iterdir()) or len(children(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        time.sleep(0.3)  # records are being written
        workers = children(proc.pid)
        os.kill(workers[0], signal.SIGKILL)  # as the OOM killer does
        t0 = time.monotonic()
        code = proc.wait(timeout=20)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0] == (
        f"resnet-imagenet convert_imageset: error: {db} not written: a decode worker (pid {workers[0]}) "
        "was killed by SIGKILL (out of memory?)"
    )
    assert took < 5, took
    assert list(tmp_path.iterdir()) == []  # neither the DB nor its temporary
    time.sleep(0.2)
    assert not [p for p in workers if alive(p)]


def _big(n: int) -> bytes:
    return bytes(n)


def test_a_worker_killed_in_the_middle_of_a_message_is_an_error_not_a_hang():
    """20 MB results: the worker blocks with part of one in the pipe while nobody reads; killed there, the parent
    must see the death (a shared queue's reader would wait for the rest of the message forever)."""
    before = set(children(os.getpid()))  # pytest's own (an earlier test's lingering helper...)
    results = run_ordered(_big, [20_000_000] * 8, jobs=2, chunk=1, window=1)
    assert len(next(results)) == 20_000_000
    time.sleep(1.0)  # both workers have their next 20 MB result half-way into their pipes
    workers = [p for p in children(os.getpid()) if alive(p) and p not in before]
    assert len(workers) == 2
    for w in workers:
        os.kill(w, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match=r"a decode worker \(pid \d+\) was killed by SIGKILL"):
        for _ in results:
            pass
    assert time.monotonic() - t0 < 5
    time.sleep(0.2)
    assert not [p for p in workers if alive(p)]


def _userns_tmpfs() -> bool:
    """Whether this machine lets an unprivileged user mount a small tmpfs in a user namespace (unshare -Urm)."""
    if not shutil.which("unshare"):
        return False
    ok = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return ok.returncode == 0


@pytest.mark.skipif(not _userns_tmpfs(), reason="no user namespaces here to mount a small tmpfs without root")
@pytest.mark.parametrize("count", [400, 3000])  # the final commit fails / a commit in the middle fails
def test_a_full_disk_is_one_line_naming_the_db_and_leaves_no_temporary(tmp_path, count):
    """A real 2 MB tmpfs (mounted in a user namespace): 64x64 raw records fill it."""
    rng = np.random.default_rng(0)
    names = write_images(tmp_path / "root", [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(8)])
    (tmp_path / "list.txt").write_text("".join(f"{names[i % 8]} 0\n" for i in range(count)))
    mnt = tmp_path / "small"
    mnt.mkdir()
    db = mnt / "db"
    convert = f"{sys.executable} -m resnet_imagenet convert_imageset --no-progress --jobs 1 {tmp_path}/root " \
              f"{tmp_path}/list.txt {db}"  # fmt: skip
    script = f"mount -t tmpfs -o size=2m tmpfs {mnt} && {convert}; echo rc=$?; ls -A {mnt}"
    out = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"resnet-imagenet convert_imageset: error: {db}: not written: the disk is full ("), err
    assert out.stdout.split() == ["rc=1"]  # and the tmpfs is empty: the temporary DB is removed


def test_a_full_disk_while_writing_the_metadata_names_the_db(tmp_path):
    """The JSON beside the records hits ENOSPC (simulated at the write call): one line, the temporary removed."""
    import errno

    from resnet_imagenet.data.db import WriteError, create_lmdb

    with pytest.raises(WriteError, match=rf"^{tmp_path}/db: not written: the disk is full \(.* No space left"):
        with create_lmdb(tmp_path / "db") as w:
            w.put(b"k", b"v")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
