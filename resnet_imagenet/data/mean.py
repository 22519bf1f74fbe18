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


def compute_image_mean(
    db: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    crop: int = 0,
    legacy: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """Mean over every record of ``db`` (float64 sums), shape 1 x C x H x W; written to ``out``.

    caffe: tools/compute_image_mean.cpp -- every record must have the same size. With ``crop`` the
    centre crop x crop of each image is averaged: the centre of the mean for equal-sized records
    (the seed's 224x224 bgr.binaryproto), and still defined when sizes vary (--min_dim LMDBs).
    """
    env = open_lmdb(db)
    total = None
    count = 0
    try:
        with env.begin() as txn:
            for key, raw in tqdm(txn.cursor(), total=env.stat()["entries"], unit="img", disable=not progress):
                name = key.decode(errors="replace")
                img = _record_image(raw, crop, f"{db}: record {name}")
                if total is None:
                    total = np.zeros(img.shape, np.float64)
                elif img.shape[2] != total.shape[2]:
                    raise ValueError(
                        f"{db}: record {name} has {img.shape[2]} channel(s), the first had {total.shape[2]}; "
                        "records differ in channels (gray and colour)"
                    )
                elif img.shape != total.shape:
                    raise ValueError(
                        f"{db}: record {name} is {img.shape[:2]}, the first was "
                        f"{total.shape[:2]}; records differ in size, so give --crop"
                    )
                total += img
                count += 1
    finally:
        close_lmdb(db)
    if not count:
        raise ValueError(f"{db}: no records")
    mean = (total / count).transpose(2, 0, 1)[None].astype(np.float32)
    log.info("Number of channels: %d", mean.shape[1])
    for c, v in enumerate(mean.mean(axis=(0, 2, 3), dtype=np.float64)):
        log.info("mean_value channel [%d]: %g", c, v)  # caffe prints these for mean_value use
    if out is not None:
        write_blobproto(mean, out, legacy=legacy)
    return mean
