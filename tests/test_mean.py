"""compute_image_mean: exact means of hand-made records, the crop convention, both blob encodings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _images import make_db

from resnet_imagenet.cli import main
from resnet_imagenet.data.mean import compute_image_mean
from resnet_imagenet.proto.blob import read_blobproto, write_blobproto


def test_mean_is_exact_bgr_chw(tmp_path, capfd):
    a = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    b = np.full((4, 6, 3), 7, np.uint8)
    db = make_db(tmp_path, [a, b, b])
    rc = main(["compute_image_mean", "--no-progress", str(db), str(tmp_path / "mean.binaryproto")])
    assert rc == 0
    mean = read_blobproto(tmp_path / "mean.binaryproto")
    want = ((a.astype(np.float64) + 2 * b) / 3).transpose(2, 0, 1)[None].astype(np.float32)
    assert mean.shape == (1, 3, 4, 6)
    np.testing.assert_array_equal(mean, want)
    err = capfd.readouterr().err
    for c in range(3):  # caffe prints the per-channel means
        assert f"mean_value channel [{c}]: {want[0, c].mean(dtype=np.float64):g}" in err


def test_crop_is_the_centre_of_the_mean(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (7, 8, 3), dtype=np.uint8) for _ in range(3)]
    db = make_db(tmp_path, imgs, encoded=True)  # lossless PNG records
    full = compute_image_mean(db, progress=False)
    crop = compute_image_mean(db, tmp_path / "m.binaryproto", crop=4, legacy=True, progress=False)
    np.testing.assert_allclose(crop, full[:, :, 1:5, 2:6], rtol=1e-6)  # (7-4)//2, (8-4)//2
    np.testing.assert_array_equal(read_blobproto(tmp_path / "m.binaryproto"), crop)


def test_sizes_differ_needs_crop(tmp_path):
    db = make_db(tmp_path, [np.zeros((4, 6, 3), np.uint8), np.zeros((6, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="give --crop"):
        compute_image_mean(db, progress=False)
    assert compute_image_mean(db, crop=4, progress=False).shape == (1, 3, 4, 4)


def test_mean_module_does_not_import_torch():
    # compute_image_mean reads LMDBs through data/db.py, not through the torch loader
    code = "import sys, resnet_imagenet.data.mean; assert not {'torch', 'resnet_imagenet.data.feed'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_load_mean_file_values_and_checks(tmp_path):
    from resnet_imagenet.data.mean import load_mean
    from resnet_imagenet.proto import caffe_pb2

    m = np.arange(3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5)
    write_blobproto(m, tmp_path / "m.binaryproto", legacy=True)
    tp = caffe_pb2.TransformationParameter(mean_file="m.binaryproto")
    got = load_mean(tp, 3, tmp_path)  # relative to base_dir
    assert got.dtype == np.float32 and got.shape == (3, 4, 5)
    np.testing.assert_array_equal(got, m[0])
    with pytest.raises(ValueError, match="layer 'data': .*m.binaryproto: mean of shape .* does not fit 1-channel"):
        load_mean(tp, 1, tmp_path, layer="data")
    tp.mean_value.append(7)
    with pytest.raises(ValueError, match="not both"):
        load_mean(tp, 3, tmp_path)
    tp.ClearField("mean_file")
    assert load_mean(tp, 3).ravel().tolist() == [7, 7, 7]  # caffe: one value for every channel
    tp.mean_value.extend([8, 9])
    assert load_mean(tp, 3).shape == (3, 1, 1) and load_mean(tp, 3).ravel().tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="3 values for 1 channels"):
        load_mean(tp, 1)
    assert load_mean(caffe_pb2.TransformationParameter(), 3) is None


def _raw_db(path, records: list[bytes]):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i, r in enumerate(records):
            txn.put(f"{i:08d}_img{i}".encode(), r)
    env.close()
    return path


def _png(img: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", img)[1].tobytes()


def test_corrupt_record_names_its_key(tmp_path):
    from resnet_imagenet.data.datum import encode_datum

    good = encode_datum(_png(np.zeros((4, 4, 3), np.uint8)), 0, encoded=True)
    db = _raw_db(tmp_path / "db", [good, encode_datum(b"not an image", 1, encoded=True)])
    with pytest.raises(ValueError, match=r"db: record 00000001_img1: not a readable image"):
        compute_image_mean(db, progress=False)


def test_gray_and_colour_records_are_reported_as_differing_channels(tmp_path):
    from resnet_imagenet.data.datum import encode_datum

    colour = encode_datum(_png(np.zeros((4, 4, 3), np.uint8)), 0, encoded=True)
    gray = encode_datum(_png(np.zeros((4, 4), np.uint8)), 1, encoded=True)
    db = _raw_db(tmp_path / "db", [colour, gray])
    with pytest.raises(ValueError, match=r"record 00000001_img1 has 1 channel\(s\), the first had 3; .*differ in chan"):
        compute_image_mean(db, progress=False)


def test_compute_image_mean_flags_default_to_its_keywords():
    import inspect

    from resnet_imagenet.cli import build_parser

    args = build_parser("compute_image_mean").parse_args(["compute_image_mean", "db"])
    keywords = inspect.signature(compute_image_mean).parameters
    assert (args.crop, args.legacy, args.progress) == tuple(keywords[k].default for k in ("crop", "legacy", "progress"))
