"""Hostile image files (issue 13 cases 3 and 5): corrupt JPEGs are skipped by name, bombs refused from the header."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from _images import smooth_image

from resnet_imagenet.data import transform as T
from resnet_imagenet.data.convert import convert_imageset
from resnet_imagenet.data.db import open_lmdb
from resnet_imagenet.data.imagesize import MAX_PIXELS, image_size

REPO = Path(__file__).resolve().parents[1]
EOI = b"\xff\xd9"


def jpeg(img: np.ndarray, progressive: bool = False) -> bytes:
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    assert ok
    return enc.tobytes()


def corrupt_jpegs(img: np.ndarray) -> dict[str, bytes]:
    """Cut short and closed with EOI at several points of the scan (baseline and progressive), and marker damage."""
    out = {}
    for prog in (False, True):
        b = jpeg(img, prog)
        sos = b.find(b"\xff\xda")
        for frac in (0.1, 0.5, 0.9, 0.99):
            cut = sos + 20 + int((len(b) - 2 - sos - 20) * frac)
            out[f"{'prog' if prog else 'base'}_cut{int(frac * 100)}.jpg"] = b[:cut] + EOI
    b = jpeg(img)
    mid = (b.find(b"\xff\xda") + len(b)) // 2
    out["stray_marker.jpg"] = b[:mid] + b"\xff\xd3" + b[mid:]  # an RST marker where none belongs
    out["extraneous.jpg"] = b[:-2] + b"\x00" * 10 + EOI  # "N extraneous bytes before marker 0xd9"
    return out


@pytest.fixture
def img() -> np.ndarray:
    return smooth_image(np.random.default_rng(0), 96, 128)


def test_every_libjpeg_warning_is_a_bad_image_in_strict_mode(img):
    for name, buf in corrupt_jpegs(img).items():
        with pytest.raises(ValueError, match=r"corrupt JPEG \(libjpeg: Corrupt JPEG data"):
            T.decode_image(buf, strict=True)
        lenient = T.decode_image(buf)  # the loader: decoded as OpenCV would, the lost rows gray
        assert lenient.shape == img.shape, name


def test_good_files_of_every_format_still_decode(img, tmp_path):
    for prog in (False, True):
        buf = jpeg(img, prog)  # simplejpeg's decode is OpenCV's, pixel for pixel
        np.testing.assert_array_equal(T.decode_image(buf, strict=True), cv2.imdecode(np.frombuffer(buf, np.uint8), 1))
    gray = T.decode_image(jpeg(img[:, :, 0]), T.GRAY, strict=True)
    assert gray.shape == (96, 128, 1) and T.native_channels(jpeg(img[:, :, 0])) == T.GRAY
    for ext in (".png", ".bmp", ".tif", ".webp"):
        ok, enc = cv2.imencode(ext, img)
        assert ok
        out = T.decode_image(enc.tobytes(), strict=True)
        assert out.shape == img.shape
        if ext != ".webp":  # lossless ones: byte for byte
            np.testing.assert_array_equal(out, img)
    ok, png = cv2.imencode(".png", img)
    assert image_size(png.tobytes()) == (96, 128) and image_size(jpeg(img, True)) == (96, 128)
    ok, bmp = cv2.imencode(".bmp", img)
    assert image_size(bmp.tobytes()) == (96, 128)


def test_convert_skips_corrupt_jpegs_by_name_and_writes_only_good_ones(img, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    bad = corrupt_jpegs(img)
    for name, buf in bad.items():
        (root / name).write_bytes(buf)
    (root / "good.jpg").write_bytes(jpeg(img))
    names = sorted(bad) + ["good.jpg"]
    (tmp_path / "list.txt").write_text("".join(f"{n} 0\n" for n in names))
    s = convert_imageset(root, tmp_path / "list.txt", tmp_path / "db", jobs=1, progress=False)
    assert s.written == 1
    assert sorted(f for f, _ in s.skipped) == sorted(bad)
    assert all(r.startswith("bad image: corrupt JPEG (libjpeg: Corrupt JPEG data") for _, r in s.skipped), s.skipped
    with open_lmdb(tmp_path / "db").begin() as txn:
        assert [k for k, _ in txn.cursor()] == [b"00000000_good.jpg"]


def bomb_jpeg(h: int, w: int) -> bytes:
    """A 16x16 JPEG whose frame header (SOF0) claims h x w pixels."""
    b = bytearray(jpeg(np.full((16, 16, 3), 128, np.uint8)))
    i = b.find(b"\xff\xc0")
    b[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(b)


def bomb_png(h: int, w: int) -> bytes:
    """A 16x16 PNG whose IHDR claims h x w pixels (with a valid CRC, so a decoder believes it)."""
    b = bytearray(cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


_RUN = """
import json, sys, time
from resnet_imagenet.data.convert import ConvertOptions, convert_imageset
t = time.time()
s = convert_imageset(sys.argv[1], sys.argv[2], sys.argv[3], ConvertOptions(max_pixels=int(sys.argv[4])), jobs=1,
                     progress=False)
# VmHWM: this process's peak (ru_maxrss would carry the forking pytest's over the exec)
hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(json.dumps({"s": time.time() - t, "rss_mb": hwm / 1024,
                  "written": s.written, "skipped": s.skipped}))
"""


def _convert_in_child(tmp_path: Path, files: dict[str, bytes], max_pixels: int, limit_as: int = 0) -> dict:
    root = tmp_path / "root"
    root.mkdir()
    for name, buf in files.items():
        (root / name).write_bytes(buf)
    (tmp_path / "list.txt").write_text("".join(f"{n} 0\n" for n in files))
    pre = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit_as}, {limit_as}))\n" if limit_as else ""
    cmd = [
        sys.executable,
        "-c",
        pre + _RUN,
        str(root),
        str(tmp_path / "list.txt"),
        str(tmp_path / "db"),
        str(max_pixels),
    ]
    out = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_decompression_bombs_are_skipped_from_the_header_quickly_and_small(img, tmp_path):
    files = {"bomb.jpg": bomb_jpeg(20000, 20000), "bomb.png": bomb_png(20000, 20000), "good.jpg": jpeg(img)}
    assert len(files["bomb.jpg"]) < 1000 and image_size(files["bomb.png"]) == (20000, 20000)
    r = _convert_in_child(tmp_path, files, MAX_PIXELS)
    assert r["written"] == 1
    want = f"bad image: too large: 20000x20000 = 400000000 pixels, over the limit of {MAX_PIXELS}"
    assert r["skipped"] == [["bomb.jpg", want], ["bomb.png", want]]
    # unchecked, the JPEG alone took 1.2 GB and 9 s (issue 13)
    assert r["s"] < 3 and r["rss_mb"] < 400, r


@pytest.mark.slow
def test_out_of_memory_in_one_image_is_a_skip_not_an_abort(img, tmp_path):
    """No pixel limit and a 4 GB address space: the 60000x60000 bomb raises a real MemoryError, skipped by name."""
    r = _convert_in_child(tmp_path, {"bomb.jpg": bomb_jpeg(60000, 60000), "good.jpg": jpeg(img)}, 0, 4 << 30)
    assert r["written"] == 1
    assert r["skipped"] == [["bomb.jpg", "bad image: out of memory decoding it (see --max-pixels)"]]


def test_max_pixels_flag(img, tmp_path, capsys):
    """--max-pixels 12287 refuses the 96x128 image (so nothing is written, one error line); 12288 takes it."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg(img))
    (tmp_path / "l.txt").write_text("a.jpg 0\n")
    from resnet_imagenet.cli import main

    assert main(["convert_imageset", "--no-progress", "--jobs", "1", "--max-pixels", "12287", str(root),
                 str(tmp_path / "l.txt"), str(tmp_path / "db1")]) == 1  # fmt: skip
    assert not (tmp_path / "db1").exists()
    assert "nothing written" in capsys.readouterr().err
    assert main(["convert_imageset", "--no-progress", "--jobs", "1", "--max-pixels", "12288", str(root),
                 str(tmp_path / "l.txt"), str(tmp_path / "db2")]) == 0  # fmt: skip
    with open_lmdb(tmp_path / "db2").begin() as txn:
        assert txn.stat()["entries"] == 1


@pytest.mark.parametrize("kind", ["base", "prog", "png"])
def test_every_cut_point_of_a_small_file_is_refused_in_strict_mode(kind):
    """Each prefix, bare or closed with EOI: a progressive JPEG cut between two scans has no libjpeg warning,
    so the strict decode also checks that its scans are all there."""
    img = smooth_image(np.random.default_rng(1), 24, 40)
    full = cv2.imencode(".png", img)[1].tobytes() if kind == "png" else jpeg(img, kind == "prog")
    accepted = []
    for cut in range(len(full) - 2):
        for tail in (b"", EOI):
            try:
                T.decode_image(full[:cut] + tail, strict=True)
                accepted.append((cut, tail))
            except ValueError:
                pass
    assert accepted == []
    assert T.decode_image(full, strict=True).shape == (24, 40, 3)
