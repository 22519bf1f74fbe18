"""The BGR mean: compute_image_mean writes it (mean.binaryproto); load_mean reads a transform_param's mean."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError
from tqdm import tqdm

from resnet_imagenet.data import transform as T
from resnet_imagenet.data.datum import datum_to_array, parse_datum
from resnet_imagenet.data.db import close_lmdb, open_lmdb
from resnet_imagenet.data.lmdbkeys import lmdb_keys
from resnet_imagenet.data.pool import run_ordered
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import read_blobproto, write_blobproto

log = logging.getLogger(__name__)


def load_mean(
    tp: caffe_pb2.TransformationParameter,
    channels: int,
    base_dir: str | os.PathLike | None = None,
    *,
    layer: str = "",
) -> np.ndarray | None:
    """The mean of ``tp`` as float32 C x H x W (mean_file) or C x 1 x 1 (mean_value); None when it has neither.

    caffe: data_transformer.cpp CHECKs that not both are set, that the mean file has the data's channels and
    that mean_value gives one value (for every channel) or one per channel. ``mean_file`` is relative to
    ``base_dir`` (default cwd); ``layer`` names the data layer in errors.
    """
    where = f"layer '{layer}': " if layer else ""
    if tp.HasField("mean_file") and len(tp.mean_value):
        raise ValueError(f"{where}give mean_file or mean_value, not both")
    if tp.HasField("mean_file"):
        path = Path(base_dir if base_dir is not None else ".") / tp.mean_file
        m = read_blobproto(path)
        m = m.reshape(m.shape[-3:]) if m.ndim >= 3 else m
        if m.ndim != 3 or m.shape[0] != channels:
            raise ValueError(f"{where}{path}: mean of shape {m.shape} does not fit {channels}-channel data")
        return np.ascontiguousarray(m, dtype=np.float32)
    if len(tp.mean_value):
        mv = list(tp.mean_value)
        if len(mv) not in (1, channels):
            raise ValueError(f"{where}mean_value has {len(mv)} values for {channels} channels")
        mv = mv * channels if len(mv) == 1 else mv  # caffe: one mean_value applies to all channels
        return np.array(mv, np.float32).reshape(channels, 1, 1)
    return None


def _record_image(raw: bytes, crop: int, where: str) -> np.ndarray:
    """One record as HxWxC (its centre crop x crop with ``crop``), native channels; errors name ``where``."""
    try:
        d = parse_datum(raw)
        img = T.decode_image(d.data, T.native_channels(d.data)) if d.encoded else datum_to_array(d)
        if crop:
            top, left = T.centre_offsets(*img.shape[:2], crop)
            img = img[top : top + crop, left : left + crop]
        return img
    except (ValueError, DecodeError) as e:  # caffe: CHECKs too (a mean over fewer records misleads)
        raise ValueError(f"{where}: {e}") from None


def _check(db: object, name: str, shape: tuple, first: tuple) -> None:
    if shape[2] != first[2]:
        raise ValueError(
            f"{db}: record {name} has {shape[2]} channel(s), the first had {first[2]}; "
            "records differ in channels (gray and colour)"
        )
    if shape != first:
        raise ValueError(
            f"{db}: record {name} is {shape[:2]}, the first was {first[:2]}; records differ in size, so give --crop"
        )


def _sum_range(task: tuple, bar: tqdm | None = None) -> tuple[np.ndarray | None, int, str]:
    """(exact int64 pixel sums, records, first key) over the keys [start, stop) of ``db``; a pool job."""
    db, start, stop, crop = task
    env = open_lmdb(db, readahead=True)  # one sequential scan: readahead halves a cold read
    total, count, first = None, 0, ""
    try:
        with env.begin() as txn:
            cur = txn.cursor()
            ok = cur.set_range(start) if start else cur.first()
            while ok and (stop is None or cur.key() < stop):
                name = cur.key().decode(errors="replace")
                img = _record_image(cur.value(), crop, f"{db}: record {name}")
                if total is None:
                    total, first = np.zeros(img.shape, np.int64), name
                else:
                    _check(db, name, img.shape, total.shape)
                total += img
                count += 1
                if bar is not None:
                    bar.update()
                ok = cur.next()
    finally:
        close_lmdb(db)
    return total, count, first


def _sum_job(task: tuple) -> tuple:
    """_sum_range in a pool worker: a bad record comes back as its message (raised by the parent)."""
    try:
        return _sum_range(task)
    except ValueError as e:
        return None, 0, str(e)


def _ranges(db: str | os.PathLike, jobs: int, crop: int) -> list[tuple]:
    """The DB cut into key ranges, a few per job (keys alone: data/lmdbkeys.py)."""
    env = open_lmdb(db)
    try:
        keys = lmdb_keys(env, db)
    finally:
        close_lmdb(db)
    cuts = sorted({len(keys) * i // (jobs * 4) for i in range(jobs * 4)})
    bounds = [bytes(keys[c]) for c in cuts if c < len(keys)] + [None]
    return [(str(db), a, b, crop) for a, b in zip(bounds[:-1], bounds[1:], strict=True)] or [
        (str(db), None, None, crop)
    ]


def compute_image_mean(
    db: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    crop: int = 0,
    legacy: bool = False,
    progress: bool = True,
    jobs: int = 1,
) -> np.ndarray:
    """Mean over every record of ``db``, shape 1 x C x H x W; written to ``out``.

    caffe: tools/compute_image_mean.cpp -- every record must have the same size. With ``crop`` the
    centre crop x crop of each image is averaged: the centre of the mean for equal-sized records
    (the seed's 224x224 bgr.binaryproto), and still defined when sizes vary (--min_dim LMDBs).
    Sums are exact integers (int64) in any order, so ``jobs`` processes (each a range of keys) give
    the same bits as one; then sum / count in float64, stored as float32.
    """
    if jobs <= 1:
        with tqdm(total=None, unit="img", disable=not progress) as bar:
            parts = [_sum_range((str(db), None, None, crop), bar)]
    else:
        parts = list(tqdm(run_ordered(_sum_job, _ranges(db, jobs, crop), jobs, chunk=1), disable=not progress))
        for total, _, why in parts:
            if total is None and why:
                raise ValueError(why)
    parts = [p for p in parts if p[1]]
    if not parts:
        raise ValueError(f"{db}: no records")
    total = parts[0][0]
    for t, _, name in parts[1:]:
        _check(db, name, t.shape, total.shape)
        total = total + t
    count = sum(p[1] for p in parts)
    mean = (total.astype(np.float64) / count).transpose(2, 0, 1)[None].astype(np.float32)
    log.info("Number of channels: %d", mean.shape[1])
    for c, v in enumerate(mean.mean(axis=(0, 2, 3), dtype=np.float64)):
        log.info("mean_value channel [%d]: %g", c, v)  # caffe prints these for mean_value use
    if out is not None:
        write_blobproto(mean, out, legacy=legacy)
    return mean
