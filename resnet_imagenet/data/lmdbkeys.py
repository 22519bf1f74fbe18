"""Every key of an LMDB in key order, read from the B-tree's branch and leaf pages only: O(keys), no value page.

A py-lmdb cursor cannot do this: ``iternext(values=False)`` still asks LMDB for each value, and LMDB
reads the first overflow page of every value bigger than about half a page (a JPEG record) to find it --
at 1.28M records of ~4 kB that is the whole data.mdb, read by every rank before its first batch
(issue 15: 8.45 s and 5.7 GB RSS). Here data.mdb is mapped with MADV_RANDOM (no readahead into value
pages) and only the tree's own pages are touched; the result is checked against LMDB itself (entry
count, first and last key) by the caller, which falls back to the cursor on any disagreement.

The on-disk layout (lmdb: libraries/liblmdb/mdb.c, data version 1, 64-bit build): a 16-byte page header
(pgno u64, pad u16, flags u16, lower u16, upper u16) followed by u16 node offsets; a node is (lo u16,
hi u16, flags u16, ksize u16, key bytes ...); a branch node's child page is lo | hi << 16 | flags << 32.
Pages 0 and 1 are meta pages; the one with the larger txnid is current. Its MDB_meta (after the page
header): magic u32, version u32, address u64, mapsize u64, then two MDB_db of 48 bytes (free DB, main DB:
pad/psize u32, flags u16, depth u16, branch/leaf/overflow page counts u64, entries u64, root u64), then
last_pg u64 and txnid u64. The free DB's pad holds the page size.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import lmdb
import numpy as np

log = logging.getLogger(__name__)

MAGIC, VERSION = 0xBEEFC0DE, 1
P_BRANCH, P_LEAF, P_LEAF2 = 0x01, 0x02, 0x20
F_DUPDATA = 0x04
MDB_DUPSORT = 0x04
HDR, NODE = 16, 8
_DB = struct.Struct("<IHHQQQQQ")  # MDB_db: pad (psize), flags, depth, branch, leaf, overflow pages, entries, root


class Unreadable(ValueError):
    """A data.mdb this reader does not understand (another layout, DUPSORT, a page out of place)."""


def _meta(buf: bytes) -> tuple[int, dict, dict]:
    """(txnid, free DB, main DB) of one meta page."""
    magic, version = struct.unpack_from("<II", buf, HDR)
    if magic != MAGIC or version != VERSION:
        raise Unreadable(f"not an LMDB data version {VERSION} meta page")
    off = HDR + 24
    names = ("psize", "flags", "depth", "branch", "leaf", "overflow", "entries", "root")
    free = dict(zip(names, _DB.unpack_from(buf, off), strict=True))
    main = dict(zip(names, _DB.unpack_from(buf, off + _DB.size), strict=True))
    (txnid,) = struct.unpack_from("<Q", buf, off + 2 * _DB.size + 8)
    return txnid, free, main


def _page(m: np.ndarray, psize: int, pgno: int, want: int) -> tuple[np.ndarray, np.ndarray]:
    """Page ``pgno`` (checked to be a ``want`` page numbered pgno) and its node offsets."""
    if (pgno + 1) * psize > len(m):
        raise Unreadable(f"page {pgno} beyond the end of data.mdb")
    page = m[pgno * psize : (pgno + 1) * psize]
    no, flags, lower = int(page[:8].view("<u8")[0]), int(page[10:12].view("<u2")[0]), int(page[12:14].view("<u2")[0])
    if no != pgno or not flags & want or flags & P_LEAF2 or lower < HDR or lower > psize:
        raise Unreadable(f"page {pgno} is not the {'branch' if want == P_BRANCH else 'leaf'} page expected")
    return page, page[HDR:lower].view("<u2").astype(np.int64)


def _children(m: np.ndarray, psize: int, pgno: int) -> np.ndarray:
    page, ptrs = _page(m, psize, pgno, P_BRANCH)
    h = page.view("<u2")  # node fields as u16 at (offset / 2)
    i = ptrs // 2
    return h[i].astype(np.int64) | h[i + 1].astype(np.int64) << 16 | h[i + 2].astype(np.int64) << 32


def _leaf_keys(m: np.ndarray, psize: int, leaves: list[int]) -> np.ndarray:
    """All keys of the ``leaves`` pages, in order, as one numpy bytes array (dtype S<longest>)."""
    if not leaves:
        return np.array([], dtype="S1")
    leaves = np.asarray(leaves, dtype=np.int64)
    if (leaves.max() + 1) * psize > len(m):
        raise Unreadable(f"page {leaves.max()} beyond the end of data.mdb")
    pages = m[: len(m) // psize * psize].reshape(-1, psize)
    found = [_leaf_nodes(pages[pg], pg, psize) for pg in np.array_split(leaves, -(-len(leaves) // 4096))]
    return _gather(m, np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found]))


def _leaf_nodes(page: np.ndarray, pg: np.ndarray, psize: int) -> tuple[np.ndarray, np.ndarray]:
    """(file offset, size) of every key of the leaf pages ``page`` (a copy of pages ``pg``, one per row), in order:
    the headers and node tables of a few thousand pages read as arrays, no Python step per page or key."""
    h = page.view("<u2")  # u16 fields at (byte offset / 2)
    flags, lower = h[:, 5], h[:, 6].astype(np.int64)
    no = np.ascontiguousarray(page[:, :8]).view("<u8")[:, 0]
    bad = (no != pg) | (flags & P_LEAF == 0) | (flags & P_LEAF2 != 0) | (lower < HDR) | (lower > psize)
    if bad.any():
        raise Unreadable(f"page {pg[bad.argmax()]} is not the leaf page expected")
    count = (lower - HDR) // 2
    cols = np.arange(count.max())
    ptr = h[:, HDR // 2 : HDR // 2 + len(cols)][cols < count[:, None]].astype(np.int64)  # page by page, in order
    row = np.repeat(np.arange(len(pg)), count)
    outside = (ptr < lower[row]) | (ptr + NODE > psize) | (ptr % 2 != 0)  # lmdb keeps nodes 2-byte aligned
    if outside.any():
        raise Unreadable(f"leaf page {pg[row[outside][0]]}: a node outside its page")
    if (h[row, ptr // 2 + 2] & F_DUPDATA).any():
        raise Unreadable("duplicate keys (DUPSORT)")
    ks = h[row, ptr // 2 + 3].astype(np.int64)
    past = ptr + NODE + ks > psize
    if past.any():
        raise Unreadable(f"leaf page {pg[row[past][0]]}: a key runs past the page")
    return pg[row] * psize + ptr + NODE, ks


def _gather(m: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The byte strings m[starts[i] : starts[i] + sizes[i]] as one S<longest> array, NUL-padded as numpy pads:
    one row copy per key from a strided view of the map (1.28M keys in ~0.03 s; a Python bytes per key took ~1 s)."""
    width = max(int(sizes.max()), 1)
    last = len(m) - width  # the last offset a whole window of ``width`` bytes starts at
    windows = np.lib.stride_tricks.as_strided(m, shape=(last + 1, width), strides=(1, 1), writeable=False)
    out = windows[np.minimum(starts, last)]
    for i in np.flatnonzero(starts > last):  # a key within ``width`` bytes of the file's end
        a, k = int(starts[i]), int(sizes[i])
        out[i] = 0
        out[i, :k] = m[a : a + k]
    out[np.arange(width) >= sizes[:, None]] = 0
    return out.view(f"S{width}").ravel()


def read_keys(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(keys in order as dtype S<n>, the entry count the meta page records) of the LMDB folder ``path``.

    Raises Unreadable for a layout this reader does not know; trailing NUL bytes of a key are lost
    (numpy's bytes dtype), as with ``np.array(list_of_keys)``.
    """
    with open(Path(path) / "data.mdb", "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 2 * 4096:
            raise Unreadable("data.mdb shorter than two pages")
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    mm.madvise(mmap.MADV_RANDOM)  # fault in the tree's pages alone, never a readahead window of values

    def willneed(pages: list[int], psize: int) -> None:
        # one request per page of a tree level before reading any: the kernel reads them concurrently,
        # where faulting them in one by one waits on each (a cold 1.28M-key DB has ~16,000 leaf pages)
        for p in pages:
            if (p + 1) * psize <= size:
                mm.madvise(mmap.MADV_WILLNEED, p * psize, psize)

    return _walk(np.frombuffer(mm, np.uint8), size, willneed)  # the map closes when the last view goes


def _walk(m: np.ndarray, size: int, willneed: Callable[[list[int], int], None]) -> tuple[np.ndarray, int]:
    metas = [_meta(m[:4096].tobytes())]
    psize = metas[0][1]["psize"]
    if psize < 512 or psize & (psize - 1) or 2 * psize > size:
        raise Unreadable(f"page size {psize}")
    metas.append(_meta(m[psize : 2 * psize].tobytes()))
    _, _, main = max(metas, key=lambda t: t[0])
    if main["flags"] & MDB_DUPSORT:
        raise Unreadable("duplicate keys (DUPSORT)")
    if main["entries"] == 0:
        return np.array([], dtype="S1"), 0
    level = [main["root"]]
    for _ in range(main["depth"] - 1):  # branch levels down to the leaves, in key order
        willneed(level, psize)
        level = np.concatenate([_children(m, psize, p) for p in level]).tolist()
    willneed(level, psize)
    return _leaf_keys(m, psize, level), main["entries"]


def lmdb_keys(env: lmdb.Environment, path: str | os.PathLike) -> np.ndarray:
    """Every key of the open LMDB ``env`` (folder ``path``) in order, without reading values (read_keys),
    checked against LMDB itself: the entry count and the first and last key. On any disagreement (another
    layout, a writer at work) the keys come from a cursor instead, which reads a page of every big value."""
    with env.begin() as txn:
        cur = txn.cursor()
        ends = (cur.key() if cur.first() else b"", cur.key() if cur.last() else b"")
        entries = txn.stat()["entries"]
        try:
            keys, n = read_keys(path)
            if n == len(keys) == entries and (not n or (bytes(keys[0]), bytes(keys[-1])) == ends):
                return keys
            why = f"{len(keys)} keys read, {entries} entries"
        except (Unreadable, OSError) as e:
            why = str(e)
        log.warning("%s: keys read through the cursor (slow: it reads every value's first page): %s", path, why)
        return np.array(list(txn.cursor().iternext(values=False)))
