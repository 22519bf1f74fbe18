"""The loader: Caffe Data / ImageData layers as a deterministic, resumable, sharded torch pipeline.

Workers (torch DataLoader processes, each opening the LMDB lazily, readonly, lock=False) decode,
resize, crop and mirror into uint8 NCHW batches; the main process copies them to the device
(pinned, non-blocking on CUDA) and does the float work there: mean subtraction, then scale
(data/devicetransform.py).

Order (TRAIN Data layers; ``order=``): Caffe's key order or a seeded permutation per epoch, shared by
rank (data/order.py). TEST reads in key order. Batches follow the stream across epoch boundaries, as
Caffe's DataLayer cycles, so every batch is full.
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
from resnet_imagenet.data.devicetransform import DeviceTransform
from resnet_imagenet.data.feedcheck import check_batch_labels, check_meta_labels, check_sizes
from resnet_imagenet.data.mean import load_mean
from resnet_imagenet.data.order import Order, Positions, check_sharing, layer_source, rand_skip
from resnet_imagenet.data.records import SKIPPED, DataError, Records, Unsupported
from resnet_imagenet.data.shapes import layer_channels
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import TRAIN, parse_phase

log = logging.getLogger(__name__)


class _Batches(Order, torch.utils.data.Dataset):
    """Item (stream position, count) -> a uint8 batch; runs in the DataLoader workers."""

    def __init__(self, recs: Records, cfg: dict):
        super().__init__(recs.n, cfg)
        self.recs = recs

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
        recs, src = layer_source(lp, phase, base, order)
        check_sharing(lp.name, recs.source, recs.n, src["batch"], rank, world_size)
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
        self._transform = DeviceTransform(
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
        self._pos = rand_skip(lp, seed)
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
    def _make_loader(self, sampler: Positions) -> torch.utils.data.DataLoader:
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
            self._loader = self._make_loader(Positions(self._pos, self.batch_size))
            self._it = iter(self._loader)
        b = next(self._it)
        out = self._finish(b)
        self._pos += len(b["label"])
        return out

    def epoch(self, epoch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over this rank's share of ``epoch`` (default: the current one); state unchanged."""
        s = self._ds.share_size()
        e = self._pos // self._ds.share_size(stream=True) if epoch is None else epoch
        for b in self._make_loader(Positions(e * s, self.batch_size, stop=(e + 1) * s)):
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
