"""One image file -> one Caffe Datum: the job convert_imageset's worker processes run (caffe: io.cpp ReadImageToDatum).

An image that cannot become a record is a reason, never an exception: missing, unreadable, a bad or
over-large image (the header pixel limit), out of memory; convert.py skips it by name.
"""

from __future__ import annotations

import dataclasses

import cv2
import simplejpeg

from resnet_imagenet.data import transform as T
from resnet_imagenet.data.datum import encode_datum


@dataclasses.dataclass
class ConvertOptions:
    """Caffe's convert_imageset flags (and --min_dim)."""

    resize_height: int = 0
    resize_width: int = 0
    min_dim: int = 0  # shorter side -> min_dim, aspect kept, only shrink
    gray: bool = False
    encoded: bool = False
    encode_type: str = ""  # default: from the file name, as Caffe
    check_size: bool = False
    max_pixels: int = T.MAX_PIXELS  # skip an image whose header declares more pixels (0: no limit)


def make_datum(buf: bytes, label: int, name: str, opts: ConvertOptions) -> tuple[bytes, tuple[int, int, int]]:
    """One image file's bytes -> a serialized Datum and the image's (C, H, W) (caffe: io.cpp ReadImageToDatum)."""
    channels = T.GRAY if opts.gray else T.COLOR
    img = T.decode_image(buf, channels, strict=True, max_pixels=opts.max_pixels)
    if opts.resize_height and opts.resize_width:
        img = T.resize_exact(img, opts.resize_height, opts.resize_width)
    elif opts.min_dim:
        img = T.resize_shorter(img, opts.min_dim, only_shrink=True)
    h, w, c = img.shape
    shape = (c, h, w)
    if not opts.encoded:
        return encode_datum(img, label), shape
    fmt = (opts.encode_type or name.rpartition(".")[2] or "jpg").lower()
    if not cv2.haveImageWriter("." + fmt):
        fmt = "jpg"
    resized = (h, w) != _header_hw(buf)
    if not resized and fmt in ("jpg", "jpeg") and _plain_jpeg(buf, channels):
        return encode_datum(buf, label, encoded=True, shape=shape), shape  # the file itself, as Caffe
    ok, enc = cv2.imencode("." + fmt, img)
    if not ok:
        raise ValueError(f"cannot encode as {fmt}")
    return encode_datum(enc.tobytes(), label, encoded=True, shape=shape), shape


def _header_hw(buf: bytes) -> tuple[int, int]:
    if buf[:2] == b"\xff\xd8":
        try:
            h, w = simplejpeg.decode_jpeg_header(buf)[:2]
            return h, w
        except ValueError:
            pass
    return -1, -1


def _plain_jpeg(buf: bytes, channels: int) -> bool:
    """A JPEG any reader decodes to ``channels`` channels (not CMYK, not a PNG named .JPEG)."""
    try:
        space = simplejpeg.decode_jpeg_header(buf)[2]
    except ValueError:
        return False
    return space in (("YCbCr", "RGB") if channels == T.COLOR else ("Gray",))


Task = tuple  # (name, label, path or bytes, options)
Result = tuple[str, int, bytes | None, str, tuple[int, int, int] | None]  # (name, label, datum, reason, shape)


def work(task: Task) -> Result:
    """Process-pool job: -> (name, label, datum or None, reason skipped, shape)."""
    name, label, src, opts = task
    try:
        if isinstance(src, bytes):
            buf = src
        else:
            with open(src, "rb") as f:
                buf = f.read()
        datum, shape = make_datum(buf, label, name, opts)
        return name, label, datum, "", shape
    except FileNotFoundError:
        return name, label, None, "missing file", None
    except IsADirectoryError:
        return name, label, None, "unreadable: a folder", None
    except OSError as e:
        return name, label, None, f"unreadable: {e.strerror or e}", None
    except ValueError as e:
        return name, label, None, f"bad image: {e}", None
    except cv2.error as e:
        return name, label, None, f"bad image: {str(e).strip().splitlines()[-1]}", None
    except MemoryError:
        return name, label, None, "bad image: out of memory decoding it (see --max-pixels)", None
