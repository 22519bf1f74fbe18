"""The loader's decoders by name: ``"exact"`` (the default) is transform.decode_image, bit-identical to
cv2.imdecode; ``"fast"`` is an opt-in JPEG decode that trades exactness for time.

``"fast"`` asks libjpeg-turbo (through simplejpeg) for its fast integer IDCT (JDCT_IFAST) and plain
replication of the subsampled chroma instead of the default triangular ("fancy") upsampling: about a
quarter less decode time on min_dim-256 JPEGs (benchmarks/bench_loader.py). The pixels differ from
cv2.imdecode's by a few levels on average; tests/test_decode_fast.py measures and bounds the difference
on photo-like images. Anything the fast call does not decode cleanly (not a JPEG, a libjpeg warning,
a truncated or corrupt file) goes to decode_image, so a bad record is reported exactly as in the
default path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import simplejpeg

from resnet_imagenet.data import transform as T

Decoder = Callable[[bytes, int], np.ndarray]


def decode_fast(buf: bytes, channels: int = T.COLOR) -> np.ndarray:
    """Image bytes as HxWxC BGR uint8, JPEGs with libjpeg-turbo's fast IDCT and upsampling (not bit-exact)."""
    if buf[:2] == b"\xff\xd8":
        T.check_pixels(buf, T.MAX_PIXELS)  # the header's size first, as decode_image (a decompression bomb)
        try:  # strict=True (simplejpeg's default): any libjpeg warning raises, and decode_image takes over
            img = simplejpeg.decode_jpeg(
                buf, colorspace="BGR" if channels == T.COLOR else "GRAY", fastdct=True, fastupsample=True
            )
            return img if img.ndim == 3 else img[:, :, None]
        except (ValueError, RuntimeError):
            pass
    return T.decode_image(buf, channels)


DECODERS: dict[str, Decoder] = {"exact": T.decode_image, "fast": decode_fast}


def decoder(name: str) -> Decoder:
    """The decoder called ``name`` (a DataFeed ``decode=`` value); one line naming the choices otherwise."""
    if name not in DECODERS:
        raise ValueError(f"decode {name!r} is not one of {', '.join(DECODERS)}")
    return DECODERS[name]
