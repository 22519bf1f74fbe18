"""``test``: top-1 / top-5 / loss over a real LMDB, checked against numpy on the raw images; ten-crop; torchrun."""

from __future__ import annotations

import socket

import lmdb
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from resnet_imagenet import cli
from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.data.devicetransform import crop_offsets_10
from resnet_imagenet.proto.blob import write_blobproto
from resnet_imagenet.tools.test import evaluate

N_IMAGES, SIZE, CROP, CLASSES = 7, 6, 4, 6

NET = """
name: "tiny-linear"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ crop_size: {crop} {mean} scale: 0.5 }}
  data_param {{ source: "val_lmdb" batch_size: 3 backend: LMDB }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param {{ num_output: {classes} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }}
layer {{ name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" }}
layer {{ name: "acc5" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc5" accuracy_param {{ top_k: 5 }} }}
"""


def write_val_lmdb(path, images: np.ndarray, labels: np.ndarray) -> None:
    """Raw Datum records ``%08d_img<i>.png`` in order."""
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (img, lab) in enumerate(zip(images, labels)):
            txn.put(f"{i:08d}_img{i}.png".encode(), encode_datum(img, int(lab)))
    env.close()


def _setup(tmp_path, mean: str, *, seed: int = 0):
    """A val LMDB of N_IMAGES raw 6x6 BGR images (7 = 3 + 3 + 1: a short last batch), a net and its weights."""
    from resnet_imagenet.net.net import load_net

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, size=N_IMAGES)
    write_val_lmdb(tmp_path / "val_lmdb", images, labels)
    mean_arr = rng.uniform(0, 255, size=(3, SIZE, SIZE)).astype(np.float32)
    write_blobproto(mean_arr[None], tmp_path / "mean.binaryproto")
    model = tmp_path / "train_val.prototxt"
    model.write_text(NET.format(crop=CROP, mean=mean, classes=CLASSES))
    net = load_net(model, phase="test")
    w = torch.from_numpy(rng.normal(0, 0.02, size=(CLASSES, 3 * CROP * CROP)).astype(np.float32))
    b = torch.from_numpy(rng.normal(0, 0.5, size=CLASSES).astype(np.float32))
    with torch.no_grad():
        net.layers["fc"].weight.copy_(w)
        net.layers["fc"].bias.copy_(b)
    net.save_caffemodel(tmp_path / "w.caffemodel")
    full_mean = mean_arr if "mean_file" in mean else np.array([10.0, 20.0, 30.0], np.float32).reshape(3, 1, 1)
    return model, images, labels, w.double().numpy(), b.double().numpy(), full_mean


def _expected(images, labels, w, b, mean, *, ten: bool):
    """top-1, top-5 and loss from numpy: crops of (pixel - mean) * 0.5, mirrored; probabilities averaged."""
    x = images.transpose(0, 3, 1, 2).astype(np.float64) - mean  # caffe: (pixel - mean) * scale
    offsets = crop_offsets_10(SIZE, SIZE, CROP) if ten else [((SIZE - CROP) // 2, (SIZE - CROP) // 2)]
    crops = [x[:, :, h : h + CROP, v : v + CROP] for h, v in offsets]
    if ten:
        crops += [c[..., ::-1] for c in crops]
    probs = 0
    for c in crops:
        z = (c * 0.5).reshape(len(c), -1) @ w.T + b
        e = np.exp(z - z.max(1, keepdims=True))
        probs = probs + e / e.sum(1, keepdims=True)
    probs = probs / len(crops)
    order = np.argsort(-probs, axis=1)
    return {
        "top-1": float(np.mean(order[:, 0] == labels)),
        "top-5": float(np.mean([lab in o[:5] for lab, o in zip(labels, order)])),
        "loss": float(np.mean(-np.log(probs[np.arange(len(labels)), labels]))),
        "images": len(labels),
    }


def _check(got, want: dict) -> None:
    """The net's outputs: acc (top-1), acc5 (top-5) and loss (loss_weight 1, so the total Loss too)."""
    assert got.images == want["images"] and got.names == ["acc", "acc5", "loss"]
    assert got["acc"] == pytest.approx(want["top-1"], abs=1e-6)
    assert got["acc5"] == pytest.approx(want["top-5"], abs=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got.loss == pytest.approx(want["loss"], rel=1e-5) and got.loss_weights == {"loss": 1.0}


@pytest.mark.parametrize("mean", ['mean_file: "mean.binaryproto"', "mean_value: 10 mean_value: 20 mean_value: 30"])
@pytest.mark.parametrize("ten", [False, True])
def test_every_image_once_exact(tmp_path, mean, ten) -> None:
    model, images, labels, w, b, m = _setup(tmp_path, mean)
    batches = []
    got = evaluate(model, tmp_path / "w.caffemodel", ten_crop=ten, num_workers=0, base_dir=tmp_path,
                   on_batch=lambda i, r: batches.append([name for name, _ in r]))  # fmt: skip
    assert batches == [["acc", "acc5", "loss"]] * 3  # 3 + 3 + 1 images: the short last batch weighs 1 image, not 3
    want = _expected(images, labels, w, b, m, ten=ten)
    _check(got, want)
    assert 0 < want["top-5"] < 1 or want["top-1"] != want["top-5"]  # the fixture is not degenerate


def test_iterations_cycle_like_caffe(tmp_path) -> None:
    model, images, labels, w, b, m = _setup(tmp_path, "mean_value: 10 mean_value: 20 mean_value: 30")
    got = evaluate(model, tmp_path / "w.caffemodel", iterations=3, num_workers=0, base_dir=tmp_path)
    # caffe test -iterations 3 with batch 3: images 0..6 then 0, 1 again (the feed cycles)
    idx = np.array([0, 1, 2, 3, 4, 5, 6, 0, 1])
    _check(got, _expected(images[idx], labels[idx], w, b, m, ten=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str, out) -> None:
    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    r = evaluate(f"{tmp}/train_val.prototxt", f"{tmp}/w.caffemodel", gpu="cpu", num_workers=0, base_dir=tmp)
    out.put((rank, r, torch.distributed.is_initialized()))  # evaluate leaves the group it joined


@pytest.mark.slow
def test_two_processes_count_each_image_once(tmp_path) -> None:
    model, images, labels, w, b, m = _setup(tmp_path, 'mean_file: "mean.binaryproto"', seed=3)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), q), nprocs=2, start_method="spawn")
    got = [q.get(timeout=60) for _ in range(2)]
    assert sorted(rank for rank, _, _ in got) == [0, 1]
    assert not any(initialized for _, _, initialized in got)
    want = _expected(images, labels, w, b, m, ten=False)
    for _, r, _ in got:  # ranks hold 4 and 3 images; the all-reduced totals are the single-process ones
        _check(r, want)


def test_cli_prints_summary(tmp_path, capsys, monkeypatch) -> None:
    model, images, labels, w, b, m = _setup(tmp_path, 'mean_file: "mean.binaryproto"')
    monkeypatch.chdir(tmp_path)
    assert cli.main(["test", "--model", str(model), "--weights", "w.caffemodel", "--workers", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    got = evaluate(model, "w.caffemodel", num_workers=0)
    # caffe: tools/caffe.cpp test() -- the mean total loss, then each output blob by name
    assert out == [f"Loss: {got.loss:.6g}", f"acc = {got['acc']:.6g}", f"acc5 = {got['acc5']:.6g}",
                   f"loss = {got['loss']:.6g} (* 1 = {got['loss']:.6g} loss)"]  # fmt: skip
    _check(got, _expected(images, labels, w, b, m, ten=False))
    assert cli.main(["test", "--model", str(model), "--weights", "missing.caffemodel"]) == 1
    assert "missing.caffemodel" in capsys.readouterr().err


def test_ten_crop_images_of_different_sizes(tmp_path) -> None:
    # --min_dim 256 LMDBs keep the aspect ratio: each image gets its own corners.
    model, _, _, w, b, _ = _setup(tmp_path, "mean_value: 10 mean_value: 20 mean_value: 30")
    rng = np.random.default_rng(7)
    shapes = [(6, 6), (7, 6), (6, 8), (8, 7), (4, 5)]
    images = [rng.integers(0, 256, size=(h, v, 3), dtype=np.uint8) for h, v in shapes]
    labels = rng.integers(0, CLASSES, size=len(images))
    env = lmdb.open(str(tmp_path / "val_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(), delete=False)
        for i, (img, lab) in enumerate(zip(images, labels)):
            txn.put(f"{i:08d}_img{i}.png".encode(), encode_datum(img, int(lab)))
    env.close()
    got = evaluate(model, tmp_path / "w.caffemodel", ten_crop=True, num_workers=0, base_dir=tmp_path)
    mean = np.array([10.0, 20.0, 30.0]).reshape(3, 1, 1)
    probs = []
    for img in images:
        x = (img.transpose(2, 0, 1) - mean) * 0.5
        crops = [x[:, h : h + CROP, v : v + CROP] for h, v in crop_offsets_10(*img.shape[:2], CROP)]
        z = np.stack([c.ravel() for c in crops + [c[..., ::-1] for c in crops]]) @ w.T + b
        e = np.exp(z - z.max(1, keepdims=True))
        probs.append((e / e.sum(1, keepdims=True)).mean(0))
    probs = np.array(probs)
    assert got.images == len(images)
    assert got["acc"] == pytest.approx(float(np.mean(probs.argmax(1) == labels)))
    assert got["loss"] == pytest.approx(float(np.mean(-np.log(probs[np.arange(len(labels)), labels]))), rel=1e-5)


def _gray_setup(tmp_path, transform: str):
    """A val LMDB of N_IMAGES raw 1-channel images and a net reading them."""
    from resnet_imagenet.net.net import load_net

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(N_IMAGES, SIZE, SIZE, 1), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, size=N_IMAGES)
    write_val_lmdb(tmp_path / "val_lmdb", images, labels)
    model = tmp_path / "train_val.prototxt"
    model.write_text(NET.replace("{mean} scale: 0.5", transform).format(crop=CROP, classes=CLASSES))
    net = load_net(model, phase="test")
    w = torch.from_numpy(rng.normal(0, 0.02, size=(CLASSES, CROP * CROP)).astype(np.float32))
    b = torch.from_numpy(rng.normal(0, 0.5, size=CLASSES).astype(np.float32))
    with torch.no_grad():
        net.layers["fc"].weight.copy_(w)
        net.layers["fc"].bias.copy_(b)
    net.save_caffemodel(tmp_path / "w.caffemodel")
    return model, images, labels, w.double().numpy(), b.double().numpy()


@pytest.mark.parametrize("ten", [False, True])
def test_force_gray_takes_one_mean_value(tmp_path, ten) -> None:
    model, images, labels, w, b = _gray_setup(tmp_path, "force_gray: true mean_value: 10 scale: 0.5")
    got = evaluate(model, tmp_path / "w.caffemodel", ten_crop=ten, num_workers=0, base_dir=tmp_path)
    _check(got, _expected(images, labels, w, b, np.full((1, 1, 1), 10.0), ten=ten))


@pytest.mark.parametrize("ten", [False, True])
def test_wrong_number_of_mean_values_is_an_error(tmp_path, ten) -> None:
    model, *_ = _setup(tmp_path, "mean_value: 10 mean_value: 20")
    with pytest.raises(ValueError, match="layer 'data': mean_value has 2 values for 3 channels"):
        evaluate(model, tmp_path / "w.caffemodel", ten_crop=ten, num_workers=0, base_dir=tmp_path)


@pytest.mark.parametrize("ten", [False, True])
def test_mean_file_and_mean_value_together_is_an_error(tmp_path, ten) -> None:
    model, *_ = _setup(tmp_path, 'mean_file: "mean.binaryproto" mean_value: 10')
    with pytest.raises(ValueError, match="layer 'data': give mean_file or mean_value, not both"):
        evaluate(model, tmp_path / "w.caffemodel", ten_crop=ten, num_workers=0, base_dir=tmp_path)


def test_ten_crop_centre_is_the_loader_centre() -> None:
    # caffe: data_transformer.cpp -- (H - crop) / 2 rounds down; odd margins put the extra row/column last
    from resnet_imagenet.data import transform as T

    for h, w in [(6, 6), (7, 6), (6, 9), (8, 7)]:
        want = ((h - CROP) // 2, (w - CROP) // 2)
        assert crop_offsets_10(h, w, CROP)[4] == T.centre_offsets(h, w, CROP) == want
        assert T.crop_offsets(h, w, CROP, False, np.random.default_rng(0)) == want
    with pytest.raises(ValueError, match="smaller than crop_size"):
        crop_offsets_10(3, 6, CROP)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without GPUs")
def test_gpu_flag_follows_train(tmp_path, capsys, monkeypatch) -> None:
    model, *_ = _setup(tmp_path, "mean_value: 10 mean_value: 20 mean_value: 30")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["test", "--model", str(model), "--weights", "w.caffemodel", "--gpu", "all"]) == 1
    assert "--gpu all: no GPU is visible" in capsys.readouterr().err  # was: invalid literal for int()
    # under torchrun the --gpu list is checked before any process group starts (no hang, no wrong device)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="GPU 0 does not exist"):
        evaluate(model, "w.caffemodel", gpu="0", num_workers=0)
    assert not torch.distributed.is_initialized()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_for_two_processes_is_an_error(tmp_path, monkeypatch) -> None:
    # was: every rank silently on cuda:0
    model, *_ = _setup(tmp_path, "mean_value: 10 mean_value: 20 mean_value: 30")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="1 GPUs for 2 process"):
        evaluate(model, tmp_path / "w.caffemodel", gpu="0", num_workers=0, base_dir=tmp_path)
