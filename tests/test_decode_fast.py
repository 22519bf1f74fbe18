"""The loader's fast paths: the opt-in fast JPEG decode (data/decode_fast.py) -- its measured distance from
cv2.imdecode, its fallbacks to the exact path, the feed's ``decode=`` choice -- and the exact fast mirror."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from _images import make_db, smooth_image
from hypothesis import given, settings
from hypothesis import strategies as st

from resnet_imagenet.data import transform as T
from resnet_imagenet.data.datum import parse_datum
from resnet_imagenet.data.decode_fast import DECODERS, decode_fast, decoder
from resnet_imagenet.data.feed import DataFeed
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradients, hard-edged shapes and noise: the edges are where plain chroma upsampling differs most."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([rng.uniform(40, 200) + rng.uniform(-60, 60) * xx / w + rng.uniform(-60, 60) * yy / h] * 3, -1)
    for _ in range(8):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(5, h // 3)), rng.uniform(0, 255, 3).tolist(), -1)
    img += rng.normal(0, 10, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 95, sampling: int = cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling])
    assert ok
    return buf.tobytes()


def imdecode(buf: bytes, flag: int = cv2.IMREAD_COLOR) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), flag)
    return img if img.ndim == 3 else img[:, :, None]


# Measured on these images (seeds 0-3, 256 x 290-320, quality 75 and 95): 4:2:0 (what convert_imageset writes)
# max 64-81 at hard colour edges, 99th percentile 12-17, mean 1.5-2.6; 4:4:4 (no chroma upsampling: the fast
# IDCT alone) max 4-16, 99th percentile 3-4, mean ~1.0. The bounds leave a margin; a wrong colour order or
# geometry breaks them at once. (On benchmarks/_synth.py's blurred photo-like images: 4:2:0 max 33, mean 1.7-2.9.)
@pytest.mark.parametrize(
    ("sampling", "max_bound", "p99_bound", "mean_bound"),
    [(cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, 96, 24, 3.5), (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, 20, 6, 1.5)],
)
@pytest.mark.parametrize("quality", [75, 95])
def test_fast_decode_stays_within_the_measured_distance_of_imdecode(
    sampling, max_bound, p99_bound, mean_bound, quality
):
    for seed in range(4):
        buf = jpeg(photo(np.random.default_rng(seed), 256, 290 + 10 * seed), quality, sampling)
        ref = imdecode(buf)
        assert np.array_equal(T.decode_image(buf), ref)  # the default path is exact
        fast = decode_fast(buf)
        assert fast.shape == ref.shape and fast.dtype == np.uint8
        d = np.abs(fast.astype(np.int16) - ref)
        assert d.max() <= max_bound and np.percentile(d, 99) <= p99_bound and d.mean() <= mean_bound
        assert d.max() > 0  # it is the fast path indeed (not exact): else the option would be pointless


def test_fast_decode_of_a_gray_jpeg_has_one_channel_near_imdecode():
    buf = jpeg(photo(np.random.default_rng(5), 64, 80)[:, :, 0])
    ref = imdecode(buf, cv2.IMREAD_GRAYSCALE)
    fast = decode_fast(buf, T.GRAY)
    assert fast.shape == ref.shape == (64, 80, 1)
    assert np.abs(fast.astype(np.int16) - ref).max() <= 16


def test_non_jpeg_and_truncated_jpeg_take_the_exact_path():
    img = smooth_image(np.random.default_rng(1), 20, 30)
    png = cv2.imencode(".png", img)[1].tobytes()
    assert np.array_equal(decode_fast(png), img)  # PNG: lossless, through decode_image
    cut = jpeg(photo(np.random.default_rng(2), 64, 64))[:-200]  # libjpeg warns: simplejpeg's strict call raises
    assert np.array_equal(decode_fast(cut), T.decode_image(cut))  # the loader's lenient verdict and pixels, exactly
    with pytest.raises(ValueError) as exact:
        T.decode_image(cut, strict=True)
    assert "corrupt JPEG" in str(exact.value)
    bomb = bytearray(jpeg(photo(np.random.default_rng(3), 64, 64)))
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2  # the header claims 20000 x 20000
    with pytest.raises(ValueError, match="pixels"):
        decode_fast(bytes(bomb))
    with pytest.raises(ValueError, match="not a readable image"):
        decode_fast(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="empty"):
        decode_fast(b"")


def test_decoder_names():
    assert decoder("exact") is T.decode_image and DECODERS["fast"] is decode_fast
    with pytest.raises(ValueError, match="decode 'turbo' is not one of exact, fast"):
        decoder("turbo")


def _layer(db, batch: int) -> caffe_pb2.LayerParameter:
    t = "crop_size: 24 mirror: true mean_value: 104 mean_value: 117 mean_value: 123"
    text = f'name: "d" type: "Data" top: "data" top: "label" transform_param {{ {t} }} data_param {{ source: "{db}" '
    return parse_text(text + f"batch_size: {batch} backend: LMDB }}", caffe_pb2.LayerParameter())


def test_feed_batches_are_the_chosen_decoders_pixels_with_the_same_crops_and_mirrors(tmp_path):
    images = [photo(np.random.default_rng(10 + i), 32, 40) for i in range(6)]
    db = make_db(tmp_path, images, encoded=True, ext=".jpg")
    geo = {}
    for name, decode in (("exact", imdecode), ("fast", decode_fast)):
        with DataFeed(_layer(db, 6), "train", seed=3, num_workers=0, decode=name) as feed:
            b = feed._ds[(0, 6, True)]  # one uint8 batch as a worker makes it: pixels, crop offsets, flips
            recs = feed._ds.recs
            for k, idx in enumerate(b["index"].tolist()):
                ho, wo, flip = b["geo"][k, :3].tolist()
                want = decode(parse_datum(recs.raw(idx)).data)[ho : ho + 24, wo : wo + 24]
                want = want[:, ::-1] if flip else want
                assert np.array_equal(b["data"][k].numpy(), want.transpose(2, 0, 1)), (name, k)
            recs.close()
        geo[name] = (b["index"].tolist(), b["geo"].tolist())
    assert geo["exact"] == geo["fast"]  # the same records, crops and mirrors: only the decode differs
    assert any(g[2] for g in geo["fast"][1]) and any(not g[2] for g in geo["fast"][1])  # both mirror states seen
    with pytest.raises(ValueError, match="decode 'x' is not one of"):
        DataFeed(_layer(db, 2), "train", num_workers=0, decode="x")


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 40), w=st.integers(1, 40), c=st.sampled_from([1, 3]), chw=st.booleans(),
    top=st.integers(0, 5), left=st.integers(0, 5), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_mirror_is_the_reversed_view_for_any_crop_and_layout(h, w, c, chw, top, left, seed):
    """T.mirror (the feed's fast mirror) equals img[:, ::-1] for HWC images and HWC views of CHW storage
    (raw Datums), cropped or not; and the batch's CHW copy of it equals the reversed view's."""
    rng = np.random.default_rng(seed)
    full = rng.integers(0, 256, (c, h + top, w + left) if chw else (h + top, w + left, c), dtype=np.uint8)
    img = (full.transpose(1, 2, 0) if chw else full)[top:, left:]
    got = T.mirror(img)
    assert got.shape == img.shape and got.dtype == np.uint8
    assert np.array_equal(got, img[:, ::-1])
    assert np.array_equal(np.stack([got.transpose(2, 0, 1)]), np.stack([img[:, ::-1].transpose(2, 0, 1)]))
