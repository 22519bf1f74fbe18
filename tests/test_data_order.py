"""Caffe's TRAIN order (``order="keys"``): the LMDB in key order, cycling, ranks interleaved as caffe 1.0's
DataLayer::Skip; rand_skip; resume exact in both orders."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest

from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.data.feed import DataFeed
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import TRAIN, parse_text

LAYER = """name: "data" type: "Data" top: "data" top: "label"
  data_param { source: "%s" batch_size: 4 backend: LMDB %s }"""


def db(tmp_path, n=10):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i in range(n):  # the label is the record's key number
            txn.put(f"{i:08d}_img{i}.jpg".encode(), encode_datum(np.full((4, 4, 3), i, np.uint8), i))
    env.close()
    return tmp_path / "db"


def feed(path, rank=0, world=1, order="keys", extra="", seed=3):
    lp = parse_text(LAYER % (path, extra), caffe_pb2.LayerParameter())
    return DataFeed(lp, TRAIN, rank=rank, world_size=world, seed=seed, num_workers=0, order=order)


def labels(f, batches):
    return [f.next()[1].tolist() for _ in range(batches)]


def test_keys_order_reads_keys_0_1_2_and_cycles(tmp_path):
    with feed(db(tmp_path)) as f:
        assert labels(f, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_each_rank_takes_every_world_size_th_record_of_the_one_cycling_stream(tmp_path):
    path = db(tmp_path)
    with feed(path, 0, 2) as r0, feed(path, 1, 2) as r1:
        assert labels(r0, 2) == [[0, 2, 4, 6], [8, 0, 2, 4]]
        assert labels(r1, 2) == [[1, 3, 5, 7], [9, 1, 3, 5]]
    with feed(path, 0, 3) as r0, feed(path, 2, 3) as r2:  # 3 does not divide 10: shares shift by epoch, as Caffe's
        assert labels(r0, 2) == [[0, 3, 6, 9], [2, 5, 8, 1]]
        assert labels(r2, 2) == [[2, 5, 8, 1], [4, 7, 0, 3]]


def test_rand_skip_starts_the_key_order_at_a_seeded_offset(tmp_path):
    path = db(tmp_path)
    starts = set()
    for seed in range(8):
        with feed(path, extra="rand_skip: 5", seed=seed) as f:
            first = labels(f, 3)
        s = first[0][0]
        assert 0 <= s < 5 and sum(first, []) == [(s + i) % 10 for i in range(12)]
        starts.add(s)
    assert len(starts) > 1  # the offset is drawn, not fixed
    with feed(path, extra="rand_skip: 5", seed=1) as a, feed(path, extra="rand_skip: 5", seed=1) as b:
        assert labels(a, 1) == labels(b, 1)


@pytest.mark.parametrize("order", ["keys", "shuffle"])
def test_resume_equals_uninterrupted_in_both_orders(tmp_path, order):
    path = db(tmp_path)
    with feed(path, 1, 2, order) as straight:
        want = labels(straight, 5)
    with feed(path, 1, 2, order) as first:
        got = labels(first, 2)
        state = first.state_dict()
    with feed(path, 1, 2, order) as second:
        second.load_state_dict(state)
        got += labels(second, 3)
    assert got == want
    if order == "shuffle":
        assert sum(want, []) != sorted(sum(want, []))


def test_unknown_order_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data order 'random' is not one of keys, shuffle"):
        feed(db(tmp_path), order="random")
