"""Caffe's top shapes of a Data / ImageData layer, from its first record (net/ cannot read data itself).

caffe: data_layer.cpp DataLayerSetUp and image_data_layer.cpp DataLayerSetUp -- the first Datum (or the first
image of the list, read with new_height/new_width and is_color) goes through DataTransformer::InferBlobShape:
channels as stored (a gray LMDB gives 1; force_color / force_gray override), height and width crop_size if set,
else the record's own. The result is passed to the net as ``input_shapes`` (train/setup.py, tools/test.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from resnet_imagenet.data import transform as T
from resnet_imagenet.data.records import Records
from resnet_imagenet.proto import caffe_pb2


def layer_channels(lp: caffe_pb2.LayerParameter, recs: Records) -> int:
    """The channels a Data / ImageData layer delivers (the feed's and the net's)."""
    tp = lp.transform_param
    if lp.type == "ImageData":
        # caffe: ReadImageToCVMat(..., is_color) -- colour unless is_color is false, whatever the file holds
        return T.GRAY if tp.force_gray or not lp.image_data_param.is_color else T.COLOR
    return T.GRAY if tp.force_gray else T.COLOR if tp.force_color else recs.native_channels()


def _records(lp: caffe_pb2.LayerParameter, base: Path) -> Records:
    if lp.type == "Data":
        return Records(base / lp.data_param.source, is_list=False)
    ip = lp.image_data_param
    return Records(
        base / ip.source, is_list=True, root=str(base / ip.root_folder), resize=(ip.new_height, ip.new_width)
    )


def record_shapes(lp: caffe_pb2.LayerParameter, base_dir: str | os.PathLike | None = None) -> list[tuple[int, ...]]:
    """Top shapes of Data / ImageData layer ``lp``: (batch, C, H, W) and (batch,) as Caffe infers them."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    recs = _records(lp, base)
    try:
        channels = layer_channels(lp, recs)
        crop = lp.transform_param.crop_size
        if crop:
            h = w = crop
        else:
            img, _ = recs.load(0, channels)
            new_dim = lp.image_data_param.new_dim if lp.type == "ImageData" else 0
            if new_dim:  # caffe-pro: the shorter side resized to new_dim
                img = T.resize_shorter(img, new_dim, bicubic=lp.image_data_param.bicubic)
            h, w = img.shape[:2]
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(
            f"layer '{lp.name}': {recs.source}: cannot read record 0 to infer the top shape: {e}"
        ) from None
    finally:
        recs.close()
    batch = lp.data_param.batch_size if lp.type == "Data" else lp.image_data_param.batch_size
    return [(batch, channels, h, w), (batch,)][: len(lp.top)]


def data_input_shapes(
    layers: Iterable[caffe_pb2.LayerParameter],
    base_dir: str | os.PathLike | None = None,
    *,
    missing_ok: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Top shapes of every Data / ImageData layer among ``layers`` (one phase's), by top name.

    ``missing_ok``: a layer whose source does not exist is left out (the net falls back to crop_size), for
    tools that run on random data (time, summary)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    out: dict[str, tuple[int, ...]] = {}
    for lp in layers:
        if lp.type in ("Data", "ImageData"):
            source = lp.data_param.source if lp.type == "Data" else lp.image_data_param.source
            if missing_ok and not (base / source).exists():
                continue
            out.update(zip(lp.top, record_shapes(lp, base)))
    return out
