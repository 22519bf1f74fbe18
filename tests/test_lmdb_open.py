"""Opening an LMDB whose keys are not the dense '%08d_' run: the keys alone are read (data/lmdbkeys.py)."""

from __future__ import annotations

import logging

import lmdb
import numpy as np
import pytest
from _pagecache import drop, resident
from hypothesis import given, settings
from hypothesis import strategies as st

from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.data.lmdbkeys import Unreadable, lmdb_keys, read_keys
from resnet_imagenet.data.records import Records


def _cursor_keys(db) -> list[bytes]:
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        keys = list(txn.cursor().iternext(values=False))
    env.close()
    return keys


def _sparse_db(path, n: int = 2000, hw: tuple[int, int] = (100, 68)) -> list[bytes]:
    """``n`` raw ~20 kB Datums (on overflow pages) under every other '%08d_' key: not dense."""
    rng = np.random.default_rng(0)
    env = lmdb.open(str(path), map_size=1 << 30)
    keys = [b"%08d_img%d.png" % (2 * i, i) for i in range(n)]
    with env.begin(write=True) as txn:
        for k in keys:
            txn.put(k, encode_datum(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), 1))
    env.sync(True)
    env.close()
    return keys


@pytest.mark.slow
def test_opening_a_sparse_db_reads_no_values(tmp_path):
    db = tmp_path / "sparse_lmdb"
    keys = _sparse_db(db)
    data = db / "data.mdb"
    drop(data)
    if resident(data)[0] > resident(data)[1] // 100:
        pytest.skip("the kernel kept data.mdb cached after POSIX_FADV_DONTNEED")
    recs = Records(db, is_list=False)
    got, pages = resident(data)
    assert recs.n == len(keys) and [bytes(k) for k in recs.keys] == keys
    # the tree is ~20 leaf pages; every value spans 5 overflow pages (10,000 in all): at most 1% read
    assert got < pages // 100, f"{got} of {pages} pages read"
    # the measure can tell: py-lmdb's keys-only cursor reads each value's first page (a fifth of the file)
    drop(data)
    _cursor_keys(db)
    assert resident(data)[0] > pages // 6
    value = recs.raw(5)
    recs.close()
    env = lmdb.open(str(db), readonly=True, lock=False)
    assert value == env.begin().get(keys[5])
    env.close()


@settings(max_examples=12, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=120).filter(lambda b: not b.endswith(b"\0")), max_size=3000, unique=True),
    st.sampled_from([0, 50, 3000, 9000]),
)
def test_read_keys_equals_the_cursor(tmp_path_factory, keys, value_size):
    db = tmp_path_factory.mktemp("keys")
    env = lmdb.open(str(db), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for k in keys:
            txn.put(k, b"v" * value_size)
    env.close()
    got, n = read_keys(db)
    assert n == len(keys)
    assert [bytes(k) for k in got] == _cursor_keys(db)


def test_many_keys_make_a_deep_tree_read_in_order(tmp_path):
    env = lmdb.open(str(tmp_path), map_size=1 << 30)
    keys = [b"%08d_%s.JPEG" % (i * 7, b"n" * 300) for i in range(3000)]  # ~10 keys a leaf: depth 3
    with env.begin(write=True) as txn:
        for k in keys:
            txn.put(k, b"x")
        depth = txn.stat()["depth"]
    env.close()
    got, _ = read_keys(tmp_path)
    assert depth >= 3 and [bytes(k) for k in got] == keys


def test_a_file_that_is_no_lmdb_is_unreadable(tmp_path):
    (tmp_path / "data.mdb").write_bytes(b"\0" * 16384)
    with pytest.raises(Unreadable):
        read_keys(tmp_path)


def test_keys_that_disagree_with_lmdb_fall_back_to_the_cursor(tmp_path, caplog):
    env = lmdb.open(str(tmp_path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k in (b"a\0", b"b", b"c\0"):  # numpy's bytes dtype loses a trailing NUL: the check sees it
            txn.put(k, b"1")
    env.close()
    env = lmdb.open(str(tmp_path), readonly=True, lock=False)
    with caplog.at_level(logging.WARNING):
        assert len(lmdb_keys(env, tmp_path)) == 3
    env.close()
    assert "through the cursor" in caplog.text


@pytest.mark.parametrize("ptr", [4095, 4090, 3], ids=["past-the-page", "node-header-cut", "odd-inside-header"])
def test_a_damaged_node_table_is_unreadable_not_a_crash(tmp_path, ptr):
    env = lmdb.open(str(tmp_path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(20):
            txn.put(b"k%03d" % i, b"v")
        assert txn.stat()["depth"] == 1  # the root is the only leaf page
    env.close()
    data = bytearray((tmp_path / "data.mdb").read_bytes())
    metas = [int.from_bytes(data[p + 16 + 24 + 48 + 40 : p + 16 + 24 + 48 + 48], "little") for p in (0, 4096)]
    txnids = [int.from_bytes(data[p + 16 + 24 + 96 + 8 : p + 16 + 24 + 96 + 16], "little") for p in (0, 4096)]
    root = metas[txnids.index(max(txnids))]  # MDB_meta: the main DB's root page of the newer meta page
    data[root * 4096 + 16 : root * 4096 + 18] = ptr.to_bytes(2, "little")  # the first node's offset
    (tmp_path / "data.mdb").write_bytes(bytes(data))
    with pytest.raises(Unreadable, match="leaf page"):
        read_keys(tmp_path)
