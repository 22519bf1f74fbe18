"""BlobProto codec: .binaryproto files (mean files) and the blobs inside caffemodels."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.util.atomic import atomic_write_bytes


def blob_shape(blob: caffe_pb2.BlobProto) -> tuple[int, ...]:
    """The blob's shape: ``shape.dim`` when present, else the legacy num/channels/height/width."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    n = len(blob.data) or len(blob.double_data)
    return (n,) if n else ()


def is_legacy(blob: caffe_pb2.BlobProto) -> bool:
    return not blob.HasField("shape") and any(blob.HasField(f) for f in ("num", "channels", "height", "width"))


def blob_to_array(blob: caffe_pb2.BlobProto) -> np.ndarray:
    """Blob data as a float32 array of the blob's shape (double_data is read too)."""
    shape = blob_shape(blob)
    if len(blob.data):
        arr = np.asarray(blob.data, dtype=np.float32)
    else:
        arr = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    count = math.prod(shape) if shape or blob.HasField("shape") else 0  # a 0-axis blob holds 1 value
    if arr.size != count:
        raise ValueError(f"blob holds {arr.size} values but its shape {shape} needs {count}")
    return arr.reshape(shape)


def array_to_blob(arr: np.ndarray, legacy: bool = False) -> caffe_pb2.BlobProto:
    """A BlobProto of float32 data; ``legacy`` writes num/channels/height/width (<= 4 axes)."""
    arr = np.asarray(arr, dtype=np.float32)  # not ascontiguousarray: it turns a 0-d array into 1-d
    blob = caffe_pb2.BlobProto()
    if legacy:
        if arr.ndim > 4:
            raise ValueError(f"legacy blobs have at most 4 axes, not {arr.ndim}")
        dims = (1,) * (4 - arr.ndim) + arr.shape
        blob.num, blob.channels, blob.height, blob.width = dims
    else:
        blob.shape.SetInParent()  # present even with no dims: a scalar blob
        blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.ravel().tolist())
    return blob


def read_binary_proto(path: str | os.PathLike, message: Message, what: str) -> Message:
    """Parse the binary protobuf file ``path`` into ``message``; errors name the file and ``what`` it should be."""
    path = Path(path)
    try:
        message.ParseFromString(path.read_bytes())
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read: {e.strerror}") from None
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"{path}: not a {what} ({e})") from None
    return message


def read_blobproto(path: str | os.PathLike) -> np.ndarray:
    """Read a .binaryproto (e.g. a mean file) in either shape encoding."""
    blob = read_binary_proto(path, caffe_pb2.BlobProto(), "BlobProto")
    try:
        return blob_to_array(blob)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def write_blobproto(arr: np.ndarray, path: str | os.PathLike, legacy: bool = False) -> None:
    atomic_write_bytes(path, array_to_blob(arr, legacy=legacy).SerializeToString())
