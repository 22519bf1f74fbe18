"""Property tests (hypothesis) of the parsers of outside bytes: image decode, Datums, list files, prototxt text.

Each holds over random and truncated input: no exception escapes but the documented bad-input one
(ValueError, which the cli prints as one line), and in convert_imageset a bad image is a reported skip.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from resnet_imagenet.data import transform as T
from resnet_imagenet.data.datum import datum_to_array, encode_datum, parse_datum
from resnet_imagenet.data.encode import ConvertOptions, work
from resnet_imagenet.data.imagelist import read_list
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError, parse_text

FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur((rng.random((40, 48, 3)) * 255).astype(np.uint8), (5, 5), 0)
    out = {}
    for name, ext, params in [
        ("base", ".jpg", []),
        ("prog", ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        ("gray", ".jpg", []),
        ("png", ".png", []),
        ("bmp", ".bmp", []),
    ]:
        ok, enc = cv2.imencode(ext, img[:, :, 0] if name == "gray" else img, params)
        assert ok
        out[name] = enc.tobytes()
    return out


FILES = _files()


def _decodes(buf: bytes, strict: bool) -> None:
    try:
        img = T.decode_image(buf, T.COLOR, strict=strict)
    except ValueError:
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size > 0


@FAST
@given(st.binary(max_size=600), st.booleans())
def test_decode_of_random_bytes_raises_only_valueerror(buf, strict):
    _decodes(buf, strict)
    _decodes(b"\xff\xd8" + buf, strict)  # past the JPEG magic
    _decodes(FILES["png"][:16] + buf, strict)  # past the PNG signature and IHDR's start
    assert T.native_channels(buf) in (T.GRAY, T.COLOR)
    assert T.native_channels(b"\xff\xd8" + buf) in (T.GRAY, T.COLOR)


@FAST
@given(st.sampled_from(sorted(FILES)), st.floats(0, 1), st.booleans(), st.booleans())
def test_decode_of_truncated_and_damaged_files_raises_only_valueerror(name, frac, eoi, strict):
    full = FILES[name]
    buf = full[: int(len(full) * frac)] + (b"\xff\xd9" if eoi else b"")
    _decodes(buf, strict)
    assert T.native_channels(buf) in (T.GRAY, T.COLOR)
    if strict and name != "bmp" and len(buf) < len(full) - 2:  # a cut JPEG or PNG never decodes strictly
        with pytest.raises(ValueError):
            T.decode_image(buf, strict=True)


@FAST
@given(st.sampled_from(sorted(FILES)), st.integers(0, 10**6), st.integers(0, 255))
def test_convert_reports_a_damaged_image_as_a_skip(name, where, byte):
    full = bytearray(FILES[name])
    full[where % len(full)] = byte
    n, label, datum, reason, shape = work(("x.jpg", 3, bytes(full), ConvertOptions()))
    assert (n, label) == ("x.jpg", 3)
    if datum is None:
        assert reason.startswith("bad image: ") and shape is None
    else:
        assert reason == "" and shape[0] == 3 and parse_datum(datum).label == 3


def _datum_ok(raw: bytes) -> None:
    try:
        d = parse_datum(raw)
        if d.encoded:
            return
        a = datum_to_array(d)
    except ValueError:
        return
    assert a.ndim == 3 and a.size == d.channels * d.height * d.width > 0


@FAST
@given(st.binary(max_size=300))
def test_parse_datum_of_random_bytes_raises_only_valueerror(raw):
    _datum_ok(raw)


@FAST
@given(st.integers(0, 400), st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1))
def test_truncated_or_misshapen_datums_raise_only_valueerror(cut, c, h):
    raw = encode_datum(np.arange(60, dtype=np.uint8).reshape(3, 4, 5), 7)
    _datum_ok(raw[:cut])
    d = caffe_pb2.Datum(channels=c, height=h, width=-1, data=bytes(abs(c * h) % 97))
    _datum_ok(d.SerializeToString())
    d = caffe_pb2.Datum(channels=c % 5, height=h % 5, width=0, float_data=[1.0] * 3)
    _datum_ok(d.SerializeToString())


LINE = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda n, lab, sep: f"{n}{sep}{lab}",
        st.text(max_size=12),
        st.integers(-(2**70), 2**70),
        st.sampled_from([" ", "  ", "\t", " +", " 0", " _"]),
    ),  # fmt: skip
)


@settings(FAST, max_examples=50)
@given(st.lists(LINE, max_size=20))
@example(["\x00 0", "a\x00b.jpg 1", "ok.jpg 2"])  # CI's random draw found the first (2026-12-03)
def test_read_list_of_random_lines(tmp_path, lines):
    f = tmp_path / "list.txt"
    f.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    items, bad = read_list(f)
    for name, label in items:
        assert name and isinstance(label, int) and -(2**31) <= label < 2**31
        assert "\x00" not in name
    for where, reason in bad:
        assert where.startswith(f"{f}:") and reason.startswith("bad list line: ")


@FAST
@given(st.lists(st.sampled_from(["layer", "{", "}", ":", "name", '"x"', "type", "1", "-", "#", "\n", " ", "input_dim",
                                 "convolution_param", "num_output", "'", "\\", "e", "inf", "nan", "<", ">", "[", "]"]),
                max_size=60), st.text(max_size=40))  # fmt: skip
def test_prototxt_text_of_random_tokens_raises_only_prototxterror(tokens, tail):
    for text in ("".join(tokens), " ".join(tokens) + tail, tail):
        try:
            parse_text(text, caffe_pb2.NetParameter())
        except PrototxtError as e:
            assert str(e).startswith("<string>")
