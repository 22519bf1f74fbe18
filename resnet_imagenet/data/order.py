"""Which record each stream position reads: the feed's order, shares and resume positions (data/feed.py).

``"keys"`` is Caffe's: the LMDB in key order, cycling, after skipping ``rand_skip`` records at random once
(old DataLayer; drawn from the seed), and rank r of W takes the records r, r+W, r+2W, ... of that endless
stream (caffe 1.0 data_layer.cpp Skip(): ``offset_ % solver_count == solver_rank``), so a rank's share
shifts by epoch when W does not divide n, as in Caffe. ``"shuffle"`` draws a permutation per epoch from
(seed, epoch) and rank r takes its positions r, r+W, ... (every rank n // W per epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from resnet_imagenet.data.records import Records
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import TRAIN

log = logging.getLogger(__name__)

ORDERS = ("keys", "shuffle")


class Order:
    """Stream position -> (epoch, record index) for ``n`` records and the feed's ``cfg`` (rank, world_size,
    seed, shuffle, caffe_keys, skip)."""

    def __init__(self, n: int, cfg: dict):
        self.n, self.cfg = n, cfg
        self._perm: dict[int, np.ndarray] = {}

    def share_size(self, stream: bool = False) -> int:
        """Images of one epoch for this rank. epoch() passes take every image once (shares differ by
        one when W does not divide n); the endless stream gives every rank n // W, so ranks cross
        epoch boundaries together and stay disjoint (the shuffle leaves out other images each epoch)."""
        n, w = self.n, self.cfg["world_size"]
        if stream and n >= w:
            return n // w
        return len(range(self.cfg["rank"], n, w))

    def order(self, epoch: int) -> np.ndarray:
        """The records of ``epoch`` in reading order (a seeded permutation, or key order)."""
        if epoch not in self._perm:
            n = self.n
            perm = np.random.default_rng([self.cfg["seed"], epoch]).permutation(n) if self.cfg["shuffle"] else None
            self._perm = {epoch: np.arange(n) if perm is None else perm}  # keep one epoch
        return self._perm[epoch]

    def index(self, pos: int, stream: bool) -> tuple[int, int]:
        """(epoch, record) read at this rank's position ``pos``."""
        c = self.cfg
        if stream and c["caffe_keys"]:  # caffe: the rank's pos-th record of the one cycling cursor
            g = c["rank"] + pos * c["world_size"]
            return g // self.n, (c["skip"] + g) % self.n
        s = self.share_size(stream)
        epoch, i = divmod(pos, s)
        return epoch, int(self.order(epoch)[self.cfg["rank"] + i * self.cfg["world_size"]])


class Positions(torch.utils.data.Sampler):
    """(position, count, endless?) items for the DataLoader: one per batch, from ``start`` (to ``stop``)."""

    def __init__(self, start: int, batch: int, stop: int | None = None):
        self.start, self.batch, self.stop = start, batch, stop

    def __iter__(self) -> Iterator[tuple[int, int, bool]]:
        p = self.start
        while self.stop is None or p < self.stop:
            n = self.batch if self.stop is None else min(self.batch, self.stop - p)
            yield (p, n, self.stop is None)  # (position, count, endless stream?)
            p += n


def rand_skip(lp: caffe_pb2.LayerParameter, seed: int) -> int:
    """caffe: data_layer.cpp / image_data_layer.cpp -- skip a random number in [0, rand_skip) of records at the
    start. Drawn from the seed, so every process skips the same number of its own records and the shares stay
    disjoint (with N processes, N times as many records are skipped in all); resume keeps the position."""
    n = lp.data_param.rand_skip if lp.type == "Data" else lp.image_data_param.rand_skip
    if not n:
        return 0
    skip = int(np.random.default_rng([seed, 2]).integers(0, n))
    log.info("layer '%s': Skipping first %d data points.", lp.name, skip)
    return skip


def check_sharing(layer: str, source: object, n: int, batch: int, rank: int, world_size: int) -> None:
    """A positive batch, a rank inside the world, and at least one record per rank."""
    if batch <= 0:
        raise ValueError(f"layer '{layer}': batch_size must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if world_size > n:
        raise ValueError(f"{source}: {n} records cannot be shared by {world_size} ranks")


def layer_source(lp: caffe_pb2.LayerParameter, phase: int, base: Path, order: str) -> tuple[Records, dict]:
    """A Data or ImageData layer's records and the reading settings of its parameter message."""
    if order not in ORDERS:
        raise ValueError(f"data order {order!r} is not one of {', '.join(ORDERS)}")
    if lp.type == "Data":
        dp = lp.data_param
        if dp.HasField("backend") and dp.backend != caffe_pb2.DataParameter.LMDB:
            raise ValueError(f"layer '{lp.name}': only backend LMDB is supported (convert LevelDBs to LMDB)")
        recs = Records(base / dp.source, is_list=False)
        keys = phase == TRAIN and order == "keys"
        src = {"batch": dp.batch_size, "shuffle": phase == TRAIN and not keys, "bicubic": False, "new_dim": 0}
        return recs, {**src, "caffe_keys": keys, "skip": 0}  # rand_skip: order.rand_skip, for either order
    if lp.type == "ImageData":
        ip = lp.image_data_param
        resize = (ip.new_height, ip.new_width)
        recs = Records(base / ip.source, is_list=True, root=str(base / ip.root_folder), resize=resize)
        src = {"batch": ip.batch_size, "shuffle": ip.shuffle, "bicubic": ip.bicubic, "new_dim": ip.new_dim}
        return recs, {**src, "caffe_keys": False, "skip": 0}
    raise ValueError(f"layer '{lp.name}': type {lp.type} is not a data layer the feed reads")
