"""compute_image_mean: the per-pixel BGR mean of an LMDB, written as a BlobProto (mean.binaryproto)."""

from __future__ import annotations

import logging
import os

import numpy as np
from tqdm import tqdm

from resnet_imagenet import transform as T
from resnet_imagenet.datum import datum_to_array, parse_datum, write_blobproto
from resnet_imagenet.lmdbio import close_lmdb, open_lmdb

log = logging.getLogger(__name__)


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
                d = parse_datum(raw)
                img = T.decode_image(d.data, T.native_channels(d.data)) if d.encoded else datum_to_array(d)
                if crop:
                    h, w = img.shape[:2]
                    if h < crop or w < crop:
                        raise ValueError(f"{db}: record {key.decode(errors='replace')} is {h}x{w}, smaller than --crop")
                    top, left = (h - crop) // 2, (w - crop) // 2  # caffe: TEST-phase centre crop
                    img = img[top : top + crop, left : left + crop]
                if total is None:
                    total = np.zeros(img.shape, np.float64)
                elif img.shape != total.shape:
                    raise ValueError(
                        f"{db}: record {key.decode(errors='replace')} is {img.shape[:2]}, the first was "
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
