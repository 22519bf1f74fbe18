"""LMDB, both sides (caffe: util/db_lmdb.cpp), without torch.

Read: open_lmdb / close_lmdb, shared by the loader's records (data/records.py) and compute_image_mean
(data/mean.py). Write: create_lmdb builds a new database under a temporary name and renames it into
place when complete (data/convert.py's builder).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import lmdb

from resnet_imagenet.util.atomic import atomic_path

log = logging.getLogger(__name__)

MAX_KEY = 511  # LMDB's default maximum key size
META_NAME = "resnet_imagenet_meta.json"  # convert's metadata inside the DB folder (data/convert.py _meta)
CLASSES_NAME = "classes.txt"  # a folder-walked DB's class names, one a line in label order, inside the DB folder

_OPEN: dict[tuple[int, str], list] = {}  # (pid, path) -> [environment, users]: lmdb opens a path once per process


def open_lmdb(path: str | os.PathLike, *, readahead: bool = False) -> lmdb.Environment:
    """Open an LMDB read-only, safe for many reader processes (no lock file writes); release with close_lmdb.

    ``readahead``: let the kernel read ahead, right for one sequential scan (compute_image_mean: a cold
    scan took half the time), wrong for the loader's random reads (the default).
    """
    key = (os.getpid(), os.path.realpath(path))
    if key in _OPEN:
        _OPEN[key][1] += 1
        return _OPEN[key][0]
    if not (Path(path) / "data.mdb").is_file():
        raise FileNotFoundError(f"{path}: not an LMDB (no data.mdb)")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=readahead, meminit=False, max_readers=512)
    except lmdb.Error as e:
        raise ValueError(f"{path}: cannot open the LMDB ({e})") from None
    _OPEN[key] = [env, 1]
    return env


def close_lmdb(path: str | os.PathLike) -> None:
    """Release one open_lmdb of ``path``; the environment closes when its last user releases it."""
    key = (os.getpid(), os.path.realpath(path))
    if key in _OPEN:
        _OPEN[key][1] -= 1
        if _OPEN[key][1] == 0:
            _OPEN.pop(key)[0].close()


class LmdbWriter:
    """Puts records into an open LMDB, one write transaction per ``batch`` records (caffe: db_lmdb.cpp Commit)."""

    def __init__(self, env: lmdb.Environment, folder: Path, *, append: bool, batch: int = 1000):
        self.env, self.folder, self.append, self.batch = env, folder, append, batch
        self.name = ""  # the DB being built, for errors (create_lmdb sets it)
        self._pending: list[tuple[bytes, bytes]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self._pending.append((key, value))
        if len(self._pending) >= self.batch:
            self.commit()

    def commit(self) -> None:
        """Write the pending records; a full map is doubled and the transaction redone (never MDB_MAP_FULL).

        Any other LMDB error (a full disk: LMDB reports a short write as EIO) raises WriteError naming the DB.
        """
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in self._pending:
                        txn.put(k, v, append=self.append)
                break
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.Error as e:
                raise write_error(
                    self.name or self.folder, self.folder, e, sum(len(v) for _, v in self._pending)
                ) from None
        self._pending = []


def close_key_holes(path: str | os.PathLike) -> int:
    """Renumber the LMDB at ``path`` so its ``%08d_`` keys run 0..n-1 again; returns the records moved.

    A build that fixes every record's number up front (convert_imagenet --shuffle) leaves a hole for
    each image it then skips, and a DB with holes loses the loader's dense fast path. Each record
    numbered n or more takes the lowest free number below n (same name after the number), in one write
    transaction: all moved or none.
    """
    env = lmdb.open(str(path), map_size=os.path.getsize(Path(path) / "data.mdb") * 2 + (1 << 20), max_dbs=0)
    try:
        with env.begin(write=True) as txn:
            n = txn.stat()["entries"]
            keys = list(txn.cursor().iternext(values=False))
            taken = {int(k[:8]) for k in keys if k[:8].isdigit() and int(k[:8]) < n}
            holes = (i for i in range(n) if i not in taken)
            moved = 0
            for k in (k for k in keys if not (k[:8].isdigit() and int(k[:8]) < n)):
                value = txn.get(k)
                txn.delete(k)
                txn.put(b"%08d_%s" % (next(holes), k[9:] if k[:8].isdigit() else k), value)
                moved += 1
        env.sync(True)
    finally:
        env.close()
    return moved


class WriteError(OSError, ValueError):
    """A DB that could not be written (the disk full...): one line naming it (a ValueError for the cli)."""


def write_error(db: str | os.PathLike, folder: Path, e: Exception, need: int = 0) -> WriteError:
    """The one-line error of a failed write into ``folder`` (building ``db``), saying when the disk is full."""
    try:
        st = os.statvfs(folder if folder.exists() else folder.parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = -1
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space" in str(e)
    if full or 0 <= free < need + (1 << 20):  # LMDB's EIO on a short write: judged by the space left
        return WriteError(f"{db}: not written: the disk is full ({free / 1e6:.1f} MB free; {e})")
    return WriteError(f"{db}: not written: {e}")


def read_meta(path: str | os.PathLike) -> dict | None:
    """The META_NAME JSON inside DB folder ``path`` (None for a DB without one, e.g. built by Caffe)."""
    f = Path(path) / META_NAME
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: unreadable ({e})") from None


def read_classes(path: str | os.PathLike) -> list[str] | None:
    """A DB's class names in label order: its own CLASSES_NAME (built with it), else the ``<db>.classes.txt``
    beside it that older builds wrote; None when it has neither (a list-file build, a Caffe DB). When both
    exist and differ, the beside one belongs to another build: the DB's own wins, with a warning."""
    db = Path(path)
    own, beside = db / CLASSES_NAME, db.with_name(db.name + ".classes.txt")
    names = [ln.strip() for ln in own.read_text().splitlines() if ln.strip()] if own.is_file() else None
    if beside.is_file():
        old = [ln.strip() for ln in beside.read_text().splitlines() if ln.strip()]
        if names is None:
            return old
        if old != names:
            log.warning("%s does not match %s (another build's?): using the DB's own", beside, own)
    return names


@contextlib.contextmanager
def create_lmdb(
    path: str | os.PathLike, *, append: bool = True, map_size: int = 1 << 30, **atomic_kw
) -> Iterator[LmdbWriter]:
    """A new LMDB at ``path``, built in a temporary folder beside it (``writer.folder``, where extra files
    may go too) and renamed onto ``path`` when the block succeeds; on an exception nothing is left behind.

    ``append``: keys come in sorted order (LMDB's MDB_APPEND, the fast path). ``atomic_kw`` (overwrite,
    check) go to util.atomic.atomic_path.
    """
    with atomic_path(path, is_dir=True, **atomic_kw) as tmp:
        # no fsync per commit: the DB is under a temporary name until env.sync(True) below
        try:
            env = lmdb.open(str(tmp), map_size=map_size, meminit=False, sync=False, max_dbs=0)
        except lmdb.Error as e:
            raise write_error(path, tmp, e) from None
        try:
            writer = LmdbWriter(env, tmp, append=append)
            writer.name = str(path)
            try:
                yield writer
            except OSError as e:  # the caller's own files in the folder (metadata) on a full disk
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise write_error(path, tmp, e) from None
                raise
            writer.commit()
            try:
                env.sync(True)
            except lmdb.Error as e:
                raise write_error(path, tmp, e) from None
        finally:
            env.close()
