"""The loader: Caffe Data / ImageData layers as a deterministic, resumable, sharded torch pipeline.

Workers (torch DataLoader processes, each opening the LMDB lazily, readonly, lock=False) decode,
resize, crop and mirror into uint8 NCHW batches; the main process copies them to the device
(pinned, non-blocking on CUDA) and does the float work there: mean subtraction, then scale
(data/transform.py's DeviceTransform).

Order (TRAIN Data layers; ``order=``): ``"keys"`` is Caffe's: the LMDB in key order, cycling, after
skipping ``rand_skip`` records at random once (old DataLayer; drawn from the seed), and rank r of W
takes the records r, r+W, r+2W, ... of that endless stream (caffe 1.0 data_layer.cpp Skip():
``offset_ % solver_count == solver_rank``), so a rank's share shifts by epoch when W does not divide
n, as in Caffe. ``"shuffle"`` draws a permutation per epoch from (seed, epoch) and rank r takes its
positions r, r+W, ... (every rank n // W per epoch). TEST reads in key order. Batches follow the
stream across epoch boundaries, as Caffe's DataLayer cycles, so every batch is full.
A sample's crop and mirror come from (seed, epoch, record index): resume == uninterrupted, for any
number of workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from resnet_imagenet.data import decode_fast
from resnet_imagenet.data import transform as T
from resnet_imagenet.data.db import read_meta
from resnet_imagenet.data.feedcheck import check_batch_labels, check_meta_labels, check_sizes
from resnet_imagenet.data.mean import load_mean
from resnet_imagenet.data.records import SKIPPED, DataError, Records, Unsupported
from resnet_imagenet.data.shapes import layer_channels
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import TRAIN, parse_phase

log = logging.getLogger(__name__)


class _Batches(torch.utils.data.Dataset):
    """Item (stream position, count) -> a uint8 batch; runs in the DataLoader workers."""

    def __init__(self, recs: Records, cfg: dict):
        self.recs, self.cfg = recs, cfg
        self._perm: dict[int, np.ndarray] = {}

    def share_size(self, stream: bool = False) -> int:
        """Images of one epoch for this rank. epoch() passes take every image once (shares differ by
        one when W does not divide n); the endless stream gives every rank n // W, so ranks cross
        epoch boundaries together and stay disjoint (the shuffle leaves out other images each epoch)."""
        n, w = self.recs.n, self.cfg["world_size"]
        if stream and n >= w:
            return n // w
        return len(range(self.cfg["rank"], n, w))

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            n = self.recs.n
            perm = np.random.default_rng([self.cfg["seed"], epoch]).permutation(n) if self.cfg["shuffle"] else None
            self._perm = {epoch: np.arange(n) if perm is None else perm}  # keep one epoch
        return self._perm[epoch]

    def index(self, pos: int, stream: bool) -> tuple[int, int]:
        c = self.cfg
        if stream and c["caffe_keys"]:  # caffe: the rank's pos-th record of the one cycling cursor
            g = c["rank"] + pos * c["world_size"]
            return g // self.recs.n, (c["skip"] + g) % self.recs.n
        s = self.share_size(stream)
        epoch, i = divmod(pos, s)
        return epoch, int(self.order(epoch)[self.cfg["rank"] + i * self.cfg["world_size"]])

    def image(self, idx: int) -> tuple[np.ndarray, int]:
        """Record ``idx`` decoded (and resized to new_dim): the image the crop is taken from."""
        img, label = self.recs.load(idx, self.cfg["channels"], self.cfg["decode"])
        if self.cfg["new_dim"]:
            img = T.resize_shorter(img, self.cfg["new_dim"], bicubic=self.cfg["bicubic"])
        return img, label

    def sample(self, epoch: int, idx: int) -> tuple[np.ndarray, int, tuple[int, int, int, int, int]]:
        c = self.cfg
        rng = np.random.default_rng([c["seed"], epoch, idx, 1])
        img, label = self.image(idx)
        h, w = img.shape[:2]
        if c["size"] and (h, w) != c["size"]:  # an odd record is skipped like a corrupt one
            raise ValueError(f"it is {h}x{w}, not {c['size'][0]}x{c['size'][1]} ({c['size_from']})")
        if c["rrc"]:
            out = T.random_resized_crop(img, c["crop"], rng)
            ho = wo = 0
        else:
            ho, wo = T.crop_offsets(h, w, c["crop"], c["train"], rng)
            ch, cw = (c["crop"], c["crop"]) if c["crop"] else (h, w)
            out = img[ho : ho + ch, wo : wo + cw]
        # caffe: data_transformer.cpp -- mirror = param.mirror() && Rand(2), in any phase
        flip = bool(c["mirror"] and rng.integers(0, 2))
        if flip:
            out = T.mirror(out)  # out[:, ::-1], copied fast (a reversed view makes the batch copy crawl)
        return out, label, (ho, wo, int(flip), h, w)

    def __getitem__(self, item: tuple[int, int, bool]) -> dict:
        try:
            return self._batch(*item)
        except DataError as e:  # the main process raises it (a worker's exception would carry its traceback)
            return {"error": str(e)}

    def _batch(self, pos: int, count: int, stream: bool) -> dict[str, torch.Tensor]:
        images, labels, geo, index, skipped = [], [], [], [], 0
        for p in range(pos, pos + count):
            epoch, idx = self.index(p, stream)
            # A bad record is skipped with a warning. The endless stream replaces it by the next good
            # one so the batch fills; an epoch() pass (testing) leaves it out, so no image counts twice.
            for attempt in range(min(self.recs.n, 64) if stream else 1):
                j = (idx + attempt) % self.recs.n
                try:
                    img, label, g = self.sample(epoch, j)
                    break
                except SKIPPED as e:  # corrupt: skip, never fatal
                    log.warning("%s: record %d skipped: %s", self.recs.source, j, e)
                    skipped += 1
            else:
                if not stream:
                    continue
                raise DataError(f"{self.recs.source}: 64 records in a row from {idx} are unreadable")
            chw = img.transpose(2, 0, 1)  # raw records are CHW already: a view, copied once below
            if images and chw.shape != images[0].shape:
                sizes = f"{chw.shape} and {images[0].shape}"
                raise ValueError(f"{self.recs.source}: images of sizes {sizes} in one batch; set crop_size")
            images.append(chw)
            labels.append(label)
            geo.append(g)
            index.append(j)
        out = np.stack(images) if images else np.empty((0, 0, 0, 0), np.uint8)
        if torch.utils.data.get_worker_info() is None:
            # In the main process, hold no environment between batches: workers forked later could
            # not open the same LMDB (lmdb refuses a second open of one file in a process).
            self.recs.close()
        return {
            "data": torch.from_numpy(out),  # N,C,H,W uint8
            "label": torch.tensor(labels, dtype=torch.int64),
            "geo": torch.tensor(geo, dtype=torch.int64),  # h_off, w_off, flip, src_h, src_w
            "index": torch.tensor(index, dtype=torch.int64),  # the records' numbers
            "skipped": torch.tensor(skipped),
        }


class _Positions(torch.utils.data.Sampler):
    def __init__(self, start: int, batch: int, stop: int | None = None):
        self.start, self.batch, self.stop = start, batch, stop

    def __iter__(self) -> Iterator[tuple[int, int, bool]]:
        p = self.start
        while self.stop is None or p < self.stop:
            n = self.batch if self.stop is None else min(self.batch, self.stop - p)
            yield (p, n, self.stop is None)  # (position, count, endless stream?)
            p += n


ORDERS = ("keys", "shuffle")


def _source(lp: caffe_pb2.LayerParameter, phase: int, base: Path, order: str, seed: int) -> tuple[Records, dict]:
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
        return recs, {**src, "caffe_keys": keys, "skip": 0}  # rand_skip: _rand_skip, for either order
    if lp.type == "ImageData":
        ip = lp.image_data_param
        resize = (ip.new_height, ip.new_width)
        recs = Records(base / ip.source, is_list=True, root=str(base / ip.root_folder), resize=resize)
        src = {"batch": ip.batch_size, "shuffle": ip.shuffle, "bicubic": ip.bicubic, "new_dim": ip.new_dim}
        return recs, {**src, "caffe_keys": False, "skip": 0}
    raise ValueError(f"layer '{lp.name}': type {lp.type} is not a data layer the feed reads")


def _rand_skip(lp: caffe_pb2.LayerParameter, seed: int) -> int:
    """caffe: data_layer.cpp / image_data_layer.cpp -- skip a random number in [0, rand_skip) of records at the
    start. Drawn from the seed, so every process skips the same number of its own records and the shares stay
    disjoint (with N processes, N times as many records are skipped in all); resume keeps the position."""
    n = lp.data_param.rand_skip if lp.type == "Data" else lp.image_data_param.rand_skip
    if not n:
        return 0
    skip = int(np.random.default_rng([seed, 2]).integers(0, n))
    log.info("layer '%s': Skipping first %d data points.", lp.name, skip)
    return skip


def _check_sharing(layer: str, recs: Records, batch: int, rank: int, world_size: int) -> None:
    if batch <= 0:
        raise ValueError(f"layer '{layer}': batch_size must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if world_size > recs.n:
        raise ValueError(f"{recs.source}: {recs.n} records cannot be shared by {world_size} ranks")


class DataFeed:
    """Batches for one Data / ImageData layer: ``data, label = feed.next()`` (see module doc)."""

    def __init__(
        self,
        layer_param: caffe_pb2.LayerParameter,
        phase: int | str,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 2,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        base_dir: str | os.PathLike | None = None,
        *,
        new_dim: int | None = None,
        random_resized_crop: bool = False,
        prefetch_factor: int = 4,
        order: str = "shuffle",
        decode: str = "exact",
    ):
        phase = parse_phase(phase)
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        lp, tp = layer_param, layer_param.transform_param
        recs, src = _source(lp, phase, base, order, seed)
        _check_sharing(lp.name, recs, src["batch"], rank, world_size)
        rrc = bool(random_resized_crop and phase == TRAIN)
        if rrc and not tp.crop_size:
            raise ValueError(f"layer '{lp.name}': random_resized_crop needs crop_size")
        channels = layer_channels(lp, recs)  # data/shapes.py: ImageData's is_color, a Datum's own channels
        cfg = {
            "rank": rank,
            "world_size": world_size,
            "seed": seed,
            "shuffle": src["shuffle"],
            "caffe_keys": src["caffe_keys"],
            "skip": src["skip"],
            "train": phase == TRAIN,
            "channels": channels,
            "crop": tp.crop_size,
            "mirror": tp.mirror,
            "rrc": rrc,
            "new_dim": new_dim if new_dim is not None else src["new_dim"],
            "bicubic": src["bicubic"],
            "size": None,  # (H, W) every record must have, else it is skipped (_check_sizes)
            "size_from": "",
            "decode": decode_fast.decoder(decode),  # "exact" (cv2.imdecode's pixels) or the opt-in "fast"
        }
        self.name, self.batch_size, self.seed, self.channels = lp.name, src["batch"], seed, channels
        self.device = torch.device(device)
        self.channels_last, self.num_workers, self.prefetch_factor = channels_last, num_workers, prefetch_factor
        self._ds = _Batches(recs, cfg)
        mean = load_mean(tp, channels, base, layer=lp.name)
        self._transform = T.DeviceTransform(
            mean,
            mean_file=tp.mean_file,
            crop=tp.crop_size,
            scale=tp.scale,
            random_crop=rrc,
            device=device,
            layer=lp.name,
        )
        self.meta = read_meta(recs.source) if not recs.is_list else None
        self._check_first_record(mean, tp.mean_file)
        self.labels: tuple[int, int | None, str] | None = None  # (classes, ignore_label, what): see check_labels
        self.skipped = 0  # records skipped (unreadable or odd-sized) so far by next()
        self._pos = _rand_skip(lp, seed)
        self._it: Iterator | None = None
        self._loader: torch.utils.data.DataLoader | None = None

    def _check_first_record(self, mean: torch.Tensor | None, mean_file: str) -> None:
        """Record 0 through decode and crop now, so a setup error (float_data Datums, a crop larger than the
        images) is one clear error instead of 64 'unreadable record' warnings; a corrupt record 0 is left to
        the feed, which skips it as any other. Also sets the size every record must have (_check_sizes)."""
        ds = self._ds
        try:
            img, _ = ds.image(0)
        except Unsupported as e:
            raise ValueError(f"layer '{self.name}': {ds.recs.source}: {e}") from None
        except SKIPPED:
            img = None
        finally:
            ds.recs.close()  # workers open their own environments
        self._check_sizes(img, mean, mean_file)
        if img is None:
            return
        h, w = img.shape[:2]
        crop = ds.cfg["crop"]
        if crop and not ds.cfg["rrc"] and (h < crop or w < crop):
            record = f"record 0 is {h}x{w}{' after new_dim' if ds.cfg['new_dim'] else ''}"
            raise ValueError(
                f"layer '{self.name}': crop_size {crop} is larger than the images of {ds.recs.source} ({record})"
            )

    def _check_sizes(self, img: np.ndarray | None, mean: np.ndarray | None, mean_file: str) -> None:
        """The size every record must have (records.py check_sizes)."""
        check_sizes(self.name, self._ds.recs.source, self._ds.cfg, self.batch_size, self.meta, img, mean, mean_file)

    def check_labels(self, classes: int, ignore: int | None, what: str) -> None:
        """Labels must lie in [0, classes) (or be ``ignore``): the build's label range (META_NAME) is checked
        now, each batch's labels by next() -- one line naming the DB and the record, not an IndexError."""
        self.labels = (classes, ignore, what)
        check_meta_labels(self.name, self._ds.recs.source, self.meta, classes, ignore, what)

    # -- positions -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return -(-self._ds.share_size() // self.batch_size)

    def state_dict(self) -> dict:
        epoch, index = divmod(self._pos, self._ds.share_size(stream=True))
        cfg = self._ds.cfg
        return {
            "epoch": epoch,
            "index": index,
            "seed": self.seed,
            "rank": cfg["rank"],
            "world_size": cfg["world_size"],
            "num_records": self._ds.recs.n,
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("seed", self.seed) != self.seed:
            log.warning("data feed '%s': resuming with seed %s, saved with %s", self.name, self.seed, d["seed"])
        if d.get("num_records", self._ds.recs.n) != self._ds.recs.n:
            log.warning("data feed '%s': the database changed size since the state was saved", self.name)
        self._stop()
        self._pos = int(d["epoch"]) * self._ds.share_size(stream=True) + int(d["index"])

    # -- batches -------------------------------------------------------------------------------
    def _make_loader(self, sampler: _Positions) -> torch.utils.data.DataLoader:
        kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        pin = self.device.type == "cuda"
        return torch.utils.data.DataLoader(
            self._ds, batch_size=None, sampler=sampler, num_workers=self.num_workers, pin_memory=pin, **kw
        )

    def _finish(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NCHW batch -> float32 NCHW on the device, mean-subtracted then scaled."""
        if "error" in b:
            raise ValueError(b["error"])
        self.skipped += int(b["skipped"])
        if self.labels is not None:
            check_batch_labels(self._ds.recs.source, b["label"], b["index"], *self.labels)
        nb = self.device.type == "cuda"
        x = self._transform(b["data"].to(self.device, non_blocking=nb), b["geo"])
        label = b["label"].to(self.device, non_blocking=nb)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, label

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._loader = self._make_loader(_Positions(self._pos, self.batch_size))
            self._it = iter(self._loader)
        b = next(self._it)
        out = self._finish(b)
        self._pos += len(b["label"])
        return out

    def epoch(self, epoch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over this rank's share of ``epoch`` (default: the current one); state unchanged."""
        s = self._ds.share_size()
        e = self._pos // self._ds.share_size(stream=True) if epoch is None else epoch
        for b in self._make_loader(_Positions(e * s, self.batch_size, stop=(e + 1) * s)):
            if "error" in b or len(b["label"]):  # a batch of only unreadable records has nothing to score
                yield self._finish(b)

    def _stop(self) -> None:
        self._it = None
        self._loader = None

    def close(self) -> None:
        self._stop()
        self._ds.recs.close()

    def __enter__(self) -> DataFeed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
