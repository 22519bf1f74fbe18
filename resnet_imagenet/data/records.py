"""Record access for the loader: index -> (image, label) from an LMDB of Datums or a Caffe image list.

Each DataLoader worker opens the LMDB lazily, readonly, without lock writes (data/db.py open_lmdb).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import lmdb
import numpy as np
from google.protobuf.message import DecodeError

from resnet_imagenet.data import transform as T
from resnet_imagenet.data.datum import datum_to_array, parse_datum
from resnet_imagenet.data.db import close_lmdb, open_lmdb
from resnet_imagenet.data.imagelist import read_list
from resnet_imagenet.data.lmdbkeys import lmdb_keys

log = logging.getLogger(__name__)

# What a bad record raises: it is skipped and reported, never fatal.
SKIPPED = (ValueError, KeyError, OSError, DecodeError, cv2.error)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_DONTNEED = 4  # linux: include/uapi/asm-generic/mman-common.h


def drop_pages(view: memoryview) -> None:
    """Unmap the pages of one consumed LMDB value from this process (madvise MADV_DONTNEED).

    The map is a clean, read-only file mapping: the pages stay in the page cache and a later read
    faults them back in; but without this every worker's RSS grows toward the DB size over an epoch
    (issue 15). Called for values of half a page or more, which LMDB keeps on their own overflow pages,
    so no B-tree page is dropped.
    """
    addr = np.frombuffer(view, np.uint8).ctypes.data
    start, end = addr & ~(mmap.PAGESIZE - 1), -(-(addr + len(view)) // mmap.PAGESIZE) * mmap.PAGESIZE
    _libc.madvise(start, end - start, MADV_DONTNEED)  # advice only: a failure changes nothing


class DataError(Exception):
    """A fault of the whole source (a corrupt LMDB, too many bad records): training stops with this one line."""


class Unsupported(ValueError):
    """A record the loader cannot use by design (not corrupt): on record 0 it is a setup error."""


class Records:
    """Index -> (image HxWxC uint8, label) for an LMDB of Datums or a Caffe image list."""

    def __init__(self, source: Path, *, is_list: bool, root: str = "", resize: tuple[int, int] = (0, 0)):
        self.source, self.is_list, self.root, self.resize = source, is_list, root, resize
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self._psize = 4096
        self.keys: np.ndarray | None = None  # None: keys are the dense '%08d_' Caffe keys
        if is_list:
            items, bad = read_list(source)
            for where, reason in bad:
                log.warning("%s: skipped: %s", where, reason)
            self.paths = [p for p, _ in items]
            self.labels = np.array([lab for _, lab in items], dtype=np.int64)
            self.n = len(items)
        else:
            env = open_lmdb(source)
            try:
                self.n = env.stat()["entries"]
                with env.begin() as txn:
                    dense = self._dense(txn)
                if not dense:  # keys written by another tool, or a deleted record: the keys alone, O(keys)
                    self.keys = lmdb_keys(env, source)
            except lmdb.Error as e:
                raise ValueError(f"{source}: the LMDB is corrupt ({e}); rebuild it") from None
            finally:
                close_lmdb(source)
        if self.n == 0:
            raise ValueError(f"{source}: no records")

    def _dense(self, txn: lmdb.Transaction) -> bool:
        cur = txn.cursor()
        first = cur.key() if cur.first() else b""
        last = cur.key() if cur.last() else b""
        return first.startswith(b"%08d_" % 0) and last.startswith(b"%08d_" % (self.n - 1))

    def native_channels(self) -> int:
        """Channels of record 0 as stored; the whole batch is made to match it."""
        try:
            if self.is_list:
                with open(os.path.join(self.root, self.paths[0]), "rb") as f:
                    return T.native_channels(f.read())
            d = parse_datum(self.raw(0))
            return T.native_channels(d.data) if d.encoded else d.channels
        except SKIPPED as e:  # a corrupt record 0 is skipped like any other; assume colour
            log.warning("%s: record 0 unreadable (%s): assuming 3 channels", self.source, e)
            return T.COLOR
        finally:
            self.close()  # workers open their own environments

    def raw(self, i: int) -> bytes:
        if self._env is None or self._pid != os.getpid():  # lazily, once per worker process
            self._env, self._pid = open_lmdb(self.source), os.getpid()
            self._psize = self._env.stat()["psize"]
        try:
            with self._env.begin(buffers=True) as txn:  # a view of the map, valid inside the transaction
                if self.keys is not None:
                    view = txn.get(bytes(self.keys[i]))
                else:
                    cur = txn.cursor()
                    prefix = b"%08d_" % i
                    view = cur.value() if cur.set_range(prefix) and cur.key()[: len(prefix)] == prefix else None
                val = None if view is None else bytes(view)
                if view is not None and len(view) >= self._psize // 2:
                    drop_pages(view)
        except lmdb.Error as e:  # smashed pages: the B-tree itself, not one record
            raise DataError(f"{self.source}: the LMDB is corrupt at record {i} ({e}); rebuild it") from None
        if val is None:
            raise KeyError(f"record {i} missing")
        return val

    def load(
        self, i: int, channels: int, decode: Callable[[bytes, int], np.ndarray] = T.decode_image
    ) -> tuple[np.ndarray, int]:
        """Record ``i`` as (HxWxC uint8, label); ``decode`` turns file bytes into pixels (data/decode_fast.py)."""
        if self.is_list:
            with open(os.path.join(self.root, self.paths[i]), "rb") as f:
                img = decode(f.read(), channels)
            return T.resize_exact(img, *self.resize), int(self.labels[i])
        d = parse_datum(self.raw(i))
        img = decode(d.data, channels) if d.encoded else datum_to_array(d)
        if img.dtype != np.uint8:
            raise Unsupported("float_data Datums are not supported by the loader (store uint8 images)")
        return T.match_channels(img, channels), int(d.label)

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            close_lmdb(self.source)
        self._env = None
