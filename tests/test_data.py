"""DataFeed: Caffe's transform semantics on hand-made arrays, order, shards, resume, bad records."""

from __future__ import annotations

import logging

import lmdb
import numpy as np
import pytest
import torch
from _images import make_db, smooth_image, write_images

from resnet_imagenet.data.feed import DataFeed
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import read_blobproto, write_blobproto
from resnet_imagenet.proto.text import parse_text


def layer(source, batch=4, *, kind="Data", transform="", extra=""):
    param = "data_param" if kind == "Data" else "image_data_param"
    backend = "backend: LMDB" if kind == "Data" else ""
    text = (
        f'name: "data" type: "{kind}" top: "data" top: "label" transform_param {{ {transform} }} '
        f'{param} {{ source: "{source}" batch_size: {batch} {backend} {extra} }}'
    )
    return parse_text(text, caffe_pb2.LayerParameter())


def overwrite_record(db, index: int, value: bytes) -> None:
    """Replace the bytes of record ``index`` (key ``%08d_...``) of the LMDB ``db``: a corrupt record."""
    env = lmdb.open(str(db))
    with env.begin(write=True) as txn:
        key = next(k for k, _ in txn.cursor() if k.startswith(b"%08d_" % index))
        txn.put(key, value)
    env.close()


def chw(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 0, 1).astype(np.float32)


def test_test_phase_centre_crop_mean_value_then_scale(tmp_path):
    img = (np.arange(6 * 8 * 3) % 251).astype(np.uint8).reshape(6, 8, 3)
    db = make_db(tmp_path, [img])
    t = "crop_size: 4 mean_value: 1 mean_value: 2 mean_value: 3 scale: 0.5"
    with DataFeed(layer(db, 1, transform=t), "test", num_workers=0) as feed:
        x, y = feed.next()
    # caffe: TEST crops at ((H - crop) / 2, (W - crop) / 2) = (1, 2); (pixel - mean) * scale
    want = (chw(img[1:5, 2:6]) - np.array([1, 2, 3], np.float32)[:, None, None]) * 0.5
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(x[0].numpy(), want)
    assert y.tolist() == [0]


def test_single_mean_value_applies_to_every_channel(tmp_path):
    img = np.full((5, 5, 3), 50, np.uint8)
    db = make_db(tmp_path, [img])
    with DataFeed(layer(db, 1, transform="mean_value: 10"), "test", num_workers=0) as feed:
        x, _ = feed.next()
    assert (x == 40).all()


def _candidates(img: np.ndarray, crop: int):
    h, w = img.shape[1:]
    for i in range(h - crop + 1):
        for j in range(w - crop + 1):
            c = img[:, i : i + crop, j : j + crop]
            yield (i, j, 0), c
            yield (i, j, 1), c[:, :, ::-1]


def test_train_random_crop_and_mirror_cover_every_offset(tmp_path):
    img = smooth_image(np.random.default_rng(1), 5, 6)
    db = make_db(tmp_path, [img] * 8)
    with DataFeed(layer(db, 8, transform="crop_size: 3 mirror: true"), "train", num_workers=0) as feed:
        seen = set()
        for _ in range(20):
            x, _ = feed.next()
            for s in x.numpy():
                match = [k for k, c in _candidates(chw(img), 3) if np.array_equal(c, s)]
                assert match, "output is not a crop (or mirrored crop) of the image"
                seen.add(match[0])
    # caffe: h_off = Rand(H - crop + 1): all 3 x 4 offsets, both mirror states
    assert {(i, j) for i, j, _ in seen} == {(i, j) for i in range(3) for j in range(4)}
    assert {f for *_, f in seen} == {0, 1}


def test_full_size_mean_file_is_cropped_and_mirrored_with_the_image(tmp_path):
    rng = np.random.default_rng(2)
    img = smooth_image(rng, 6, 7)
    mean = rng.random((1, 3, 6, 7)).astype(np.float32) * 100
    write_blobproto(mean, tmp_path / "mean.binaryproto")
    make_db(tmp_path, [img] * 4)
    t = 'crop_size: 4 mirror: true scale: 0.25 mean_file: "mean.binaryproto"'
    with DataFeed(layer("db", 4, transform=t), "train", num_workers=0, base_dir=tmp_path) as feed:
        x, _ = feed.next()
    # caffe: data_transformer.cpp subtracts data_mean_[c, h_off + h, w_off + w] before the flip
    diff = (chw(img) - mean[0]) * 0.25
    for s in x.numpy():
        assert any(np.allclose(c, s, atol=1e-5) for _, c in _candidates(diff, 4))


def test_crop_sized_mean_file_is_subtracted_after_the_crop(tmp_path):
    rng = np.random.default_rng(3)
    img = smooth_image(rng, 8, 8)
    mean = rng.random((1, 3, 4, 4)).astype(np.float32) * 100
    write_blobproto(mean, tmp_path / "mean.binaryproto", legacy=True)
    make_db(tmp_path, [img])
    t = 'crop_size: 4 mean_file: "mean.binaryproto"'
    with DataFeed(layer("db", 1, transform=t), "test", num_workers=0, base_dir=tmp_path) as feed:
        x, _ = feed.next()
    np.testing.assert_allclose(x[0].numpy(), chw(img[2:6, 2:6]) - mean[0], atol=1e-5)


def test_mean_file_of_the_wrong_size_is_a_clear_error(tmp_path):
    write_blobproto(np.zeros((1, 3, 5, 5), np.float32), tmp_path / "m.binaryproto")
    db = make_db(tmp_path, [np.zeros((8, 8, 3), np.uint8)])
    t = 'crop_size: 4 mean_file: "m.binaryproto"'
    with pytest.raises(ValueError, match=r"mean_file is \(5, 5\) but record 0 of .* is \(8, 8\)"):
        DataFeed(layer(db, 1, transform=t), "test", num_workers=0, base_dir=tmp_path)


def test_record_of_another_size_than_the_mean_file_is_skipped_and_counted(tmp_path, caplog):
    write_blobproto(np.zeros((1, 3, 8, 8), np.float32), tmp_path / "m.binaryproto")
    db = make_db(tmp_path, [np.zeros((8, 8, 3), np.uint8), np.full((9, 8, 3), 7, np.uint8)])
    t = 'crop_size: 4 mean_file: "m.binaryproto"'
    with DataFeed(layer(db, 2, transform=t), "test", num_workers=0, base_dir=tmp_path) as feed:
        x, _ = feed.next()  # record 1 (9x8) is skipped, the stream fills the batch with record 0
        assert feed.skipped == 1 and x.shape == (2, 3, 4, 4) and x.abs().max() == 0
    assert "record 1 skipped: it is 9x8, not 8x8 (the size of mean_file m.binaryproto)" in caplog.text
    assert "1 records are not 8x8" in caplog.text  # from the build's record sizes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_size_mean_on_cuda_does_not_synchronise(tmp_path):
    rng = np.random.default_rng(4)
    write_blobproto(rng.random((1, 3, 6, 7)).astype(np.float32) * 100, tmp_path / "m.binaryproto")
    make_db(tmp_path, [smooth_image(rng, 6, 7)] * 4)
    t = 'crop_size: 4 mirror: true mean_file: "m.binaryproto"'
    with DataFeed(layer("db", 4, transform=t), "train", num_workers=0, device="cuda", base_dir=tmp_path) as feed:
        feed.next()  # warm up (first-use allocations)
        torch.cuda.set_sync_debug_mode("error")  # any GPU -> host wait raises
        try:
            x, _ = feed.next()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert x.is_cuda


def test_reference_mean_files_load_to_the_same_array(reference_dir):
    a = read_blobproto(reference_dir / "resnet-imagenet-caffe" / "bgr.binaryproto")
    b = read_blobproto(reference_dir / "resnet-imagenet-caffe" / "resnet_50" / "ResNet_mean.binaryproto")
    assert a.shape == b.shape == (1, 3, 224, 224)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a.mean(axis=(0, 2, 3)), [103.06, 115.90, 123.15], atol=0.01)


def test_encoded_and_raw_records_give_the_same_batch(tmp_path):
    imgs = [smooth_image(np.random.default_rng(i), 9, 11) for i in range(3)]
    raw = make_db(tmp_path, imgs, name="raw")
    enc = make_db(tmp_path, imgs, name="enc", encoded=True)  # PNG files stay PNG: lossless
    t = "crop_size: 7 mean_value: 100"
    out = []
    for db in (raw, enc):
        with DataFeed(layer(db, 3, transform=t), "test", num_workers=0) as feed:
            out.append(feed.next())
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def _labels(feed, epoch=None):
    return [lab for _, y in feed.epoch(epoch) for lab in y.tolist()]


def test_train_order_is_a_fresh_deterministic_permutation_each_epoch(tmp_path):
    db = make_db(tmp_path, [np.zeros((4, 4, 3), np.uint8)] * 10)
    feeds = [DataFeed(layer(db, 3), "train", seed=s, num_workers=0) for s in (0, 0, 1)]
    e0, e1 = _labels(feeds[0], 0), _labels(feeds[0], 1)
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert e0 != e1
    assert _labels(feeds[1], 0) == e0 and _labels(feeds[2], 0) != e0
    test_feed = DataFeed(layer(db, 3), "test", num_workers=0)
    assert _labels(test_feed, 0) == list(range(10))  # TEST reads in key order, as Caffe


def test_ranks_read_disjoint_shares_covering_every_image(tmp_path):
    db = make_db(tmp_path, [np.zeros((4, 4, 3), np.uint8)] * 10)
    shares = []
    for rank in range(3):
        feed = DataFeed(layer(db, 3), "train", rank=rank, world_size=3, num_workers=0)
        batches = [y.tolist() for _, y in feed.epoch()]
        assert len(batches) == len(feed)
        assert all(len(b) == 3 for b in batches[:-1])
        shares.append([lab for b in batches for lab in b])
    assert sorted(len(s) for s in shares) == [3, 3, 4]
    assert sorted(lab for s in shares for lab in s) == list(range(10))


def test_resume_equals_uninterrupted(tmp_path):
    imgs = [smooth_image(np.random.default_rng(i), 7, 7) for i in range(5)]
    db = make_db(tmp_path, imgs, encoded=True, ext=".jpg")
    lp = layer(db, 3, transform="crop_size: 5 mirror: true mean_value: 120")
    full = DataFeed(lp, "train", seed=7, num_workers=2)
    want = [full.next() for _ in range(6)]  # crosses epoch boundaries (5 images, batches of 3)
    full.close()
    first = DataFeed(lp, "train", seed=7, num_workers=0)
    for _ in range(2):
        first.next()
    state = first.state_dict()
    assert state["epoch"] == 1 and state["index"] == 1
    resumed = DataFeed(lp, "train", seed=7, num_workers=1)
    resumed.load_state_dict(state)
    got = [resumed.next() for _ in range(4)]
    resumed.close()
    for (xw, yw), (xg, yg) in zip(want[2:], got):
        assert torch.equal(xw, xg) and torch.equal(yw, yg)


def test_corrupt_record_is_skipped_with_a_warning_and_the_batch_fills(tmp_path, caplog):
    db = make_db(tmp_path, [np.full((4, 4, 3), i, np.uint8) for i in range(4)], encoded=True)
    overwrite_record(
        db, 2, caffe_pb2.Datum(encoded=True, data=b"\xff\xd8 not really a jpeg", label=2).SerializeToString()
    )
    with caplog.at_level(logging.WARNING), DataFeed(layer(db, 4), "test", num_workers=0) as feed:
        _, y = feed.next()
    assert y.tolist() == [0, 1, 3, 3]  # record 2 replaced by the next good one
    assert "record 2 skipped" in caplog.text


def test_channels_last_output(tmp_path):
    db = make_db(tmp_path, [smooth_image(np.random.default_rng(0), 6, 6)] * 2)
    with DataFeed(layer(db, 2, transform="crop_size: 4"), "test", num_workers=0, channels_last=True) as feed:
        x, _ = feed.next()
    assert x.shape == (2, 3, 4, 4) and x.is_contiguous(memory_format=torch.channels_last)


def test_force_gray_decodes_encoded_records_to_one_channel(tmp_path):
    img = smooth_image(np.random.default_rng(0), 6, 6)
    db = make_db(tmp_path, [img], encoded=True)
    with DataFeed(layer(db, 1, transform="force_gray: true"), "test", num_workers=0) as feed:
        x, _ = feed.next()
    import cv2

    # caffe: DecodeDatumToCVMat(datum, is_color=false) is cv::imdecode(..., IMREAD_GRAYSCALE)
    assert x.shape == (1, 1, 6, 6)
    gray = cv2.imread(str(tmp_path / "db_images" / "img000.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(x[0, 0].numpy(), gray)


def test_image_data_layer_with_new_dim(tmp_path):
    imgs = [smooth_image(np.random.default_rng(i), 20, 30) for i in range(2)]
    names = write_images(tmp_path / "im", imgs)
    (tmp_path / "list.txt").write_text("".join(f"{n} {i + 5}\n" for i, n in enumerate(names)))
    lp = layer("list.txt", 2, kind="ImageData", transform="crop_size: 8", extra='new_dim: 10 root_folder: "im/"')
    with DataFeed(lp, "test", num_workers=0, base_dir=tmp_path) as feed:
        x, y = feed.next()
    import cv2

    small = cv2.resize(imgs[0], (15, 10), interpolation=cv2.INTER_AREA)  # shorter side 20 -> 10
    np.testing.assert_array_equal(x[0].numpy(), chw(small[1:9, 3:11]))
    assert y.tolist() == [5, 6]


def test_random_resized_crop_option(tmp_path):
    db = make_db(tmp_path, [smooth_image(np.random.default_rng(0), 20, 24)] * 4)
    lp = layer(db, 4, transform="crop_size: 8 mirror: true")
    with DataFeed(lp, "train", num_workers=0, random_resized_crop=True) as feed:
        x, _ = feed.next()
    assert x.shape == (4, 3, 8, 8)
    assert not torch.equal(x[0], x[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_feed_equals_cpu_feed(tmp_path):
    db = make_db(tmp_path, [smooth_image(np.random.default_rng(i), 9, 9) for i in range(4)], encoded=True)
    lp = layer(db, 4, transform="crop_size: 7 mirror: true mean_value: 100 scale: 0.5")
    with DataFeed(lp, "train", num_workers=1) as cpu, DataFeed(lp, "train", num_workers=1, device="cuda") as gpu:
        (xc, yc), (xg, yg) = cpu.next(), gpu.next()
    assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)


def test_epoch_pass_leaves_a_corrupt_record_out_instead_of_scoring_a_neighbour_twice(tmp_path, caplog):
    db = make_db(tmp_path, [np.full((4, 4, 3), i, np.uint8) for i in range(5)], encoded=True)
    overwrite_record(db, 2, caffe_pb2.Datum(encoded=True, data=b"\xff\xd8 broken", label=2).SerializeToString())
    with caplog.at_level(logging.WARNING), DataFeed(layer(db, 2), "test", num_workers=0) as feed:
        labels = [y.tolist() for _, y in feed.epoch()]
    assert labels == [[0, 1], [3], [4]]
    assert "record 2 skipped" in caplog.text


def test_training_stream_keeps_ranks_in_step_when_world_size_does_not_divide(tmp_path):
    db = make_db(tmp_path, [np.zeros((4, 4, 3), np.uint8)] * 10)
    feeds = [DataFeed(layer(db, 3), "train", rank=r, world_size=3, num_workers=0) for r in range(3)]
    for _ in range(2):  # two epochs of 10 // 3 = 3 images per rank, one batch each
        seen = [f.next()[1].tolist() for f in feeds]
        flat = [lab for s in seen for lab in s]
        assert len(flat) == len(set(flat)) == 9  # disjoint within the epoch, 1 image left out
    assert [f.state_dict()["epoch"] for f in feeds] == [2, 2, 2]


def test_crop_larger_than_the_images_is_a_setup_error_not_corrupt_records(tmp_path, caplog):
    db = make_db(tmp_path, [np.zeros((4, 5, 3), np.uint8)] * 3)
    caplog.clear()  # make_db's own summary ("skipped 0") is not what this test is about
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as e:
        DataFeed(layer(db, 2, transform="crop_size: 5"), "test", num_workers=0)
    assert str(e.value) == f"layer 'data': crop_size 5 is larger than the images of {db} (record 0 is 4x5)"
    assert "skipped" not in caplog.text


def test_float_data_datums_are_a_setup_error(tmp_path, caplog):
    db = tmp_path / "float_lmdb"
    env = lmdb.open(str(db), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i in range(3):
            d = caffe_pb2.Datum(channels=1, height=2, width=2, float_data=[0.5] * 4, label=i)
            txn.put(b"%08d_f" % i, d.SerializeToString())
    env.close()
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match=r"layer 'data': .*float_lmdb: float_data"):
        DataFeed(layer(db, 2), "test", num_workers=0)
    assert "skipped" not in caplog.text


def test_a_corrupt_first_record_is_still_skipped(tmp_path, caplog):
    db = make_db(tmp_path, [np.full((6, 6, 3), i, np.uint8) for i in range(3)], encoded=True)
    overwrite_record(db, 0, caffe_pb2.Datum(encoded=True, data=b"\x89PNG broken", label=0).SerializeToString())
    with caplog.at_level(logging.WARNING), DataFeed(layer(db, 2, transform="crop_size: 4"), "test", num_workers=0) as f:
        _, y = f.next()
    assert y.tolist() == [1, 1]  # record 0 replaced by the next good one
    assert "record 0 skipped" in caplog.text


def test_record_zero_that_is_not_a_datum_is_skipped_not_a_crash(tmp_path, caplog):
    db = make_db(tmp_path, [np.full((4, 4, 3), i, np.uint8) for i in range(3)])
    overwrite_record(db, 0, b"\x0a\xff\xff garbage, not a protobuf")
    with caplog.at_level(logging.WARNING), DataFeed(layer(db, 2), "test", num_workers=0) as feed:
        labels = [y.tolist() for _, y in feed.epoch()]
    assert labels == [[1], [2]]
    assert "record 0 unreadable" in caplog.text


def test_device_transform_reads_a_full_mean_at_each_crops_source_pixels():
    from resnet_imagenet.data.devicetransform import DeviceTransform

    mean = np.arange(12, dtype=np.float32).reshape(1, 3, 4)  # 1 channel, the images' 3x4
    t = DeviceTransform(mean, mean_file="m.binaryproto", crop=2, scale=0.5)
    x = torch.zeros((2, 1, 2, 2), dtype=torch.uint8)
    geo = torch.tensor([[1, 1, 0, 3, 4], [0, 2, 1, 3, 4]])  # h_off, w_off, flip, src_h, src_w
    out = t(x, geo)
    assert out.dtype == torch.float32
    # image 0: rows 1-2, cols 1-2 of the mean; image 1 is mirrored: cols 2-3 read right to left
    assert out[0, 0].tolist() == [[-2.5, -3.0], [-4.5, -5.0]]
    assert out[1, 0].tolist() == [[-1.5, -1.0], [-3.5, -3.0]]
    with pytest.raises(ValueError, match=r"layer 'd': mean_file is \(3, 4\) but an image is \(3, 5\)"):
        DeviceTransform(mean, mean_file="m.binaryproto", crop=2, layer="d")(x, torch.tensor([[0, 0, 0, 3, 5]] * 2))
    with pytest.raises(ValueError, match="m.binaryproto: random_resized_crop needs a crop-sized mean"):
        DeviceTransform(mean, mean_file="m.binaryproto", crop=2, random_crop=True)


def test_device_transform_crop_sized_mean_mirrors_and_mean_value_broadcasts():
    from resnet_imagenet.data.devicetransform import DeviceTransform

    x = torch.full((2, 1, 2, 2), 10, dtype=torch.uint8)
    geo = torch.tensor([[1, 3, 0, 9, 9], [0, 5, 1, 9, 9]])  # offsets and source size do not matter here
    crop_mean = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)  # crop-sized: subtracted after the crop
    out = DeviceTransform(crop_mean, mean_file="m.binaryproto", crop=2)(x, geo)
    assert out[0, 0].tolist() == [[9.0, 8.0], [7.0, 6.0]]
    assert out[1, 0].tolist() == [[8.0, 9.0], [6.0, 7.0]]  # mirrored with the image
    value = np.array([3.0], np.float32).reshape(1, 1, 1)  # mean_value 3, scale 2: (10 - 3) * 2
    assert DeviceTransform(value, scale=2.0)(x, geo).unique().tolist() == [14.0]
