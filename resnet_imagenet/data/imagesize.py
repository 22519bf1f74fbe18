"""An image file's pixel size from its header alone, so a decompression bomb is refused before it is decoded.

A 600-byte JPEG can claim 20000 x 20000 pixels: decoding it takes 1.2 GB and seconds (issue 13). The
decoder (data/transform.py decode_image) asks ``check_pixels`` first. Formats read here: JPEG (the SOFn
frame header), PNG (IHDR), BMP and GIF; any other goes to OpenCV, whose own limit is 2^30 pixels
(OpenCV imgcodecs: OPENCV_IO_MAX_IMAGE_PIXELS, default 1 << 30).
"""

from __future__ import annotations

import struct

# PIL's Image.MAX_IMAGE_PIXELS (2^30 / 4 / 3, ~89.5 MPix: 256 MiB as 24-bit BGR): a limit users know,
# 4x a 24-MPix camera photo and far above ImageNet's photos, and small enough that each decode process
# of a many-core build stays well under 1 GB.
MAX_PIXELS = (1 << 30) // 4 // 3

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers SOF0..SOF15 (ITU T.81 table B.1); C4 (DHT), C8 (JPG) and CC (DAC) are not frames
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(buf: bytes) -> tuple[int, int] | None:
    """(height, width) of the first SOFn segment (ITU T.81 B.2.2: length, precision, Y, X)."""
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or scan data before any frame header
            return None
        (length,) = struct.unpack_from(">H", buf, i + 2)
        if marker in _SOF:
            if i + 9 > n:
                return None
            return struct.unpack_from(">HH", buf, i + 5)
        i += 2 + length
    return None


def image_size(buf: bytes) -> tuple[int, int] | None:
    """(height, width) that the header of image file ``buf`` declares; None when unknown or unreadable."""
    if buf[:2] == b"\xff\xd8":
        return _jpeg_size(buf)
    if buf[:8] == _PNG and len(buf) >= 24 and buf[12:16] == b"IHDR":
        w, h = struct.unpack_from(">II", buf, 16)
        return h, w
    if buf[:2] == b"BM" and len(buf) >= 26:
        w, h = struct.unpack_from("<ii", buf, 18)  # a negative height is a top-down BMP
        return abs(h), abs(w)
    if buf[:4] == b"GIF8" and len(buf) >= 10:
        w, h = struct.unpack_from("<HH", buf, 6)
        return h, w
    return None


def check_pixels(buf: bytes, max_pixels: int = MAX_PIXELS) -> None:
    """Raise ValueError when the header of ``buf`` declares more than ``max_pixels`` pixels (0: no limit)."""
    if max_pixels <= 0:
        return
    hw = image_size(buf)
    if hw is not None and hw[0] * hw[1] > max_pixels:
        raise ValueError(f"too large: {hw[0]}x{hw[1]} = {hw[0] * hw[1]} pixels, over --max-pixels {max_pixels}")
