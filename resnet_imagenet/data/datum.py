"""Datum: the LMDB record of Caffe's convert_imageset (raw CHW pixels or an encoded image file)."""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from resnet_imagenet.proto import caffe_pb2


def encode_datum(
    image: np.ndarray | bytes, label: int, *, encoded: bool = False, shape: tuple[int, int, int] | None = None
) -> bytes:
    """Serialize one record.

    ``image`` is an HxWxC (or HxW) BGR uint8 array stored raw as CHW, or, with ``encoded``, the
    bytes of an image file; then ``shape`` (C, H, W) may be recorded (Caffe leaves it 0).
    """
    d = caffe_pb2.Datum(label=int(label))
    if encoded:
        d.encoded = True
        d.data = bytes(image)
        if shape is not None:
            d.channels, d.height, d.width = shape
        return d.SerializeToString()
    img = np.asarray(image, dtype=np.uint8)
    if img.ndim == 2:
        img = img[:, :, None]
    h, w, c = img.shape
    d.channels, d.height, d.width = c, h, w
    d.data = np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes()
    return d.SerializeToString()


def parse_datum(raw: bytes) -> caffe_pb2.Datum:
    """A serialized Datum; ValueError for bytes that are not one (a damaged record)."""
    d = caffe_pb2.Datum()
    try:
        d.ParseFromString(raw)
    except DecodeError as e:
        raise ValueError(f"not a Datum ({e})") from None
    return d


def datum_to_array(d: caffe_pb2.Datum) -> np.ndarray:
    """A raw (non-encoded) Datum as an HxWxC uint8 array (BGR for colour)."""
    if d.encoded:
        raise ValueError("encoded datum: decode the image bytes instead")
    c, h, w = d.channels, d.height, d.width
    if min(c, h, w) <= 0:
        raise ValueError(f"datum of shape {c}x{h}x{w} holds no image")
    if len(d.data) == c * h * w:
        chw = np.frombuffer(d.data, dtype=np.uint8).reshape(c, h, w)
    elif len(d.float_data) == c * h * w:
        chw = np.asarray(d.float_data, dtype=np.float32).reshape(c, h, w)
    else:
        raise ValueError(f"datum of shape {c}x{h}x{w} holds {len(d.data)} bytes and {len(d.float_data)} floats")
    return chw.transpose(1, 2, 0)
