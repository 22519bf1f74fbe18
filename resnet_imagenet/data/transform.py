"""Caffe's DataTransformer (caffe: data_transformer.cpp), its host half: uint8 images, one at a time.

Loader workers and convert_imageset's processes decode, resize, crop and mirror here; the float work
(mean, scale, the 10 crops) is done on whole batches in the main process by data/devicetransform.py.
Workers so pass uint8 crops, 4x less to copy than float, and this module never imports torch.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import simplejpeg

from resnet_imagenet.data.imagesize import MAX_PIXELS, check_pixels, progressive_complete

cv2.setNumThreads(1)  # one image per process; parallelism comes from processes

COLOR, GRAY = 3, 1


def decode_image(
    buf: bytes, channels: int = COLOR, *, strict: bool = False, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Image file bytes as an HxWxC BGR uint8 array (C = ``channels``: 3 colour or 1 gray).

    JPEGs go through simplejpeg (libjpeg-turbo, bit-identical to cv2.imdecode and faster);
    anything else (PNG, BMP...) through cv2.imdecode, which reads by content, not by name.
    ``strict`` (convert_imageset) rejects a JPEG on any libjpeg warning ("Corrupt JPEG data: premature
    end of data segment"...), where the lenient decode (the loader) fills the lost rows with gray as OpenCV.
    A header that declares more than ``max_pixels`` pixels is refused before decoding (data/imagesize.py).
    Raises ValueError for bytes that are not a readable image.
    """
    if not buf:
        raise ValueError("empty (zero-byte) file")
    check_pixels(buf, max_pixels)
    img = _decode_jpeg(buf, channels, strict) if buf[:2] == b"\xff\xd8" else None
    if img is None:
        # EXIF orientation ignored, as simplejpeg (and Caffe's OpenCV 2.4) do: one file, one geometry
        flag = (cv2.IMREAD_COLOR if channels == COLOR else cv2.IMREAD_GRAYSCALE) | cv2.IMREAD_IGNORE_ORIENTATION
        try:
            img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), flag)
        except cv2.error as e:
            raise ValueError(f"not a readable image ({str(e).strip().splitlines()[-1]})") from None
    if img is None or img.size == 0:
        raise ValueError("not a readable image (truncated, corrupt or not an image)")
    return img if img.ndim == 3 else img[:, :, None]


def _decode_jpeg(buf: bytes, channels: int, strict: bool) -> np.ndarray | None:
    """simplejpeg's decode; None where libjpeg-turbo cannot read the file at all (OpenCV then tries, unless strict).

    simplejpeg's strict=True raises on libjpeg's warnings too (TJFLAG_STOPONWARNING); the second, lenient
    decode tells a warning (decodable, but corrupt) from an error. A progressive JPEG cut between scans
    raises no warning: strict also checks that its scans are all there.
    """
    space = "BGR" if channels == COLOR else "GRAY"
    try:
        img = simplejpeg.decode_jpeg(buf, colorspace=space, strict=True)
    except (ValueError, RuntimeError) as e:
        warning = str(e).strip()
    else:
        if strict and not progressive_complete(buf):
            raise ValueError("truncated progressive JPEG (its last scans are missing)")
        return img
    try:
        img = simplejpeg.decode_jpeg(buf, colorspace=space, strict=False)
    except (ValueError, RuntimeError):
        if strict:  # OpenCV would not say whether it met a warning
            raise ValueError(f"not a readable JPEG (truncated or corrupt; libjpeg: {warning})") from None
        return None
    if strict:
        raise ValueError(f"corrupt JPEG (libjpeg: {warning})")
    return img


def native_channels(buf: bytes) -> int:
    """Channels an image file decodes to natively (caffe: DecodeDatumToCVMatNative): 1 for gray, else 3.

    Reads the header only for JPEGs; other formats are decoded, after the pixel limit (decode_image's).
    """
    if buf[:2] == b"\xff\xd8":
        try:
            return GRAY if simplejpeg.decode_jpeg_header(buf)[2] == "Gray" else COLOR
        except ValueError:
            pass
    try:
        check_pixels(buf)
        img = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except (ValueError, cv2.error):
        return COLOR  # decode_image refuses it later, by name
    return GRAY if img is not None and img.ndim == 2 else COLOR


def match_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Convert a gray image to 3-channel BGR or a BGR image to gray, as needed."""
    c = img.shape[2]
    if c == channels:
        return img
    if channels == COLOR and c == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if channels == GRAY and c == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None]
    if channels == COLOR and c == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


def _interp(shrink: bool, bicubic: bool) -> int:
    if bicubic:
        return cv2.INTER_CUBIC
    return cv2.INTER_AREA if shrink else cv2.INTER_LINEAR


def resize_shorter(img: np.ndarray, dim: int, *, only_shrink: bool = False, bicubic: bool = False) -> np.ndarray:
    """Resize so the shorter side is ``dim``, keeping the aspect ratio (caffe-pro new_dim).

    ``only_shrink`` leaves smaller images alone (ImageMagick's ``-resize "256^>"``). Shrinking uses
    area averaging (no aliasing); enlarging is bilinear as Caffe's cv::resize.
    """
    h, w = img.shape[:2]
    short = min(h, w)
    if dim <= 0 or short == dim or (only_shrink and short <= dim):
        return img
    if h <= w:
        nh, nw = dim, max(1, round(w * dim / h))
    else:
        nh, nw = max(1, round(h * dim / w)), dim
    out = cv2.resize(img, (nw, nh), interpolation=_interp(dim < short, bicubic))
    return out if out.ndim == 3 else out[:, :, None]


def resize_exact(img: np.ndarray, height: int, width: int, *, bicubic: bool = False) -> np.ndarray:
    """Resize to height x width when both are set (caffe: io.cpp ReadImageToCVMat uses cv::resize)."""
    if height <= 0 or width <= 0 or img.shape[:2] == (height, width):
        return img
    out = cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC if bicubic else cv2.INTER_LINEAR)
    return out if out.ndim == 3 else out[:, :, None]


def centre_offsets(h: int, w: int, crop: int) -> tuple[int, int]:
    """Top-left corner of the centre crop x crop window: the one centre used by the loader, test and mean.

    caffe: data_transformer.cpp -- TEST phase crops the centre, h_off = (H - crop) / 2.
    """
    if h < crop or w < crop:
        raise ValueError(f"image {h}x{w} is smaller than crop_size {crop}")
    return (h - crop) // 2, (w - crop) // 2


def crop_offsets(h: int, w: int, crop: int, train: bool, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of the crop_size window.

    caffe: data_transformer.cpp -- TRAIN takes Rand(H - crop + 1), TEST crops the centre (H - crop) / 2.
    """
    if crop <= 0:
        return 0, 0
    centre = centre_offsets(h, w, crop)  # also checks the size
    if not train:
        return centre
    return int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))


def mirror(img: np.ndarray) -> np.ndarray:
    """``img[:, ::-1]`` (left-right mirror of an HxWxC image) as a new array, the same pixels.

    cv2.flip copies rows with SIMD; the reversed view would make the batch's later copy into CHW go
    element by element (about 40x slower for a 224x224x3 crop: docs_snippets/d15loader.md). An HWC view of
    CHW storage (a raw Datum) is flipped plane by plane and returned as an HWC view of CHW storage again,
    so the batch's transpose back to CHW is a plain copy.
    """
    if img.shape[2] > 1 and img.strides[2] != img.itemsize:  # an HWC view of CHW storage (a raw Datum)
        return np.stack([cv2.flip(img[:, :, c], 1) for c in range(img.shape[2])]).transpose(1, 2, 0)
    out = cv2.flip(img, 1)
    return out if out.ndim == 3 else out[:, :, None]


def random_resized_box(
    h: int,
    w: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random area/aspect box: the modern (Inception/torchvision) crop."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    # Fallback: the largest centred box within the ratio limits.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    top, left, ch, cw = random_resized_box(img.shape[0], img.shape[1], rng)
    patch = img[top : top + ch, left : left + cw]
    out = cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)
    return out if out.ndim == 3 else out[:, :, None]
