"""An image file's pixel size from its header alone, so a decompression bomb is refused before it is decoded.

A 600-byte JPEG can claim 20000 x 20000 pixels: decoding it takes 1.2 GB and seconds (issue 13). The
decoder (data/transform.py decode_image) asks ``check_pixels`` first. Formats read here: JPEG (the SOFn
frame header), PNG (IHDR), BMP and GIF; any other goes to OpenCV, whose own limit is 2^30 pixels
(OpenCV imgcodecs: OPENCV_IO_MAX_IMAGE_PIXELS, default 1 << 30).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

# PIL's Image.MAX_IMAGE_PIXELS (2^30 / 4 / 3, ~89.5 MPix: 256 MiB as 24-bit BGR): a limit users know,
# 4x a 24-MPix camera photo and far above ImageNet's photos, and small enough that each decode process
# of a many-core build stays well under 1 GB.
MAX_PIXELS = (1 << 30) // 4 // 3

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers SOF0..SOF15 (ITU T.81 table B.1); C4 (DHT), C8 (JPG) and CC (DAC) are not frames
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # in entropy-coded data: a marker, not a stuffed byte or RSTn
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _segments(buf: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start of its payload, payload end) of a JPEG's marker segments, skipping entropy-coded data."""
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return
        marker = buf[i + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, TEM, RSTn, SOI: no length
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:
            return
        end = i + 2 + struct.unpack_from(">H", buf, i + 2)[0]
        yield marker, i + 4, min(end, n)
        i = end
        if marker == 0xDA:  # entropy-coded data up to the next marker that is not a stuffed 0xFF00 or an RSTn
            m = _MARKER.search(buf, i)
            if m is None:
                return
            i = m.start()


def progressive_complete(buf: bytes) -> bool:
    """Whether a progressive JPEG's scans bring every coefficient of every component to full precision.

    A progressive file cut between two scans and closed with EOI decodes without a libjpeg warning, its last
    refinements missing (found by tests/test_properties.py). ITU T.81 G.1.1: a scan codes coefficients Ss..Se
    of its components down to bit Al; all 64 must reach Al = 0. True for a baseline JPEG.
    """
    comps: list[int] = []
    done: dict[int, int] = {}  # component id -> bit k set when coefficient k has had its last bit (Al = 0)
    for marker, a, b in _segments(buf):
        if marker in _SOF and marker not in (0xC2, 0xCA):  # not progressive (Huffman or arithmetic)
            return True
        if marker in (0xC2, 0xCA) and a + 6 <= b:  # frame header: P, Y, X, Nf, then (Ci, Hi|Vi, Tqi) each
            comps = [buf[a + 6 + 3 * k] for k in range(buf[a + 5]) if a + 6 + 3 * k < b]
        elif marker == 0xDA and a < b:
            ns = buf[a]
            ids = buf[a + 1 : a + 1 + 2 * ns : 2]
            if a + 1 + 2 * ns + 3 > b:
                return False
            ss, se, ahal = buf[a + 1 + 2 * ns : a + 4 + 2 * ns]
            if ahal & 0x0F == 0:
                band = ((1 << (min(se, 63) + 1)) - 1) & ~((1 << ss) - 1)
                for c in ids:
                    done[c] = done.get(c, 0) | band
    return bool(comps) and all(done.get(c, 0) == (1 << 64) - 1 for c in comps)


def image_size(buf: bytes) -> tuple[int, int] | None:
    """(height, width) that the header of image file ``buf`` declares; None when unknown or unreadable."""
    if buf[:2] == b"\xff\xd8":  # the first SOFn frame header (ITU T.81 B.2.2: length, precision, Y, X)
        sof = next(((a, b) for m, a, b in _segments(buf) if m in _SOF), None)
        return struct.unpack_from(">HH", buf, sof[0] + 1) if sof and sof[0] + 5 <= sof[1] else None
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
        raise ValueError(f"too large: {hw[0]}x{hw[1]} = {hw[0] * hw[1]} pixels, over the limit of {max_pixels}")
