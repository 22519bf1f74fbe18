"""BVLC Caffe's own example and model prototxts, unchanged, build in both phases and train one step.

Each runs in a tmp folder that holds tiny data files at the paths the prototxt names (examples/mnist/
mnist_train_lmdb, ...), so the prototxt is read as shipped; only the ImageNet models get a smaller batch_size.
A net that needs a layer type not registered yet is skipped, naming the layer (the catalogue is issue 11's).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import lmdb
import numpy as np
import pytest

from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.net.layers import LAYERS
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import write_blobproto
from resnet_imagenet.proto.text import DATA_LAYER_TYPES, read_net, to_text
from resnet_imagenet.tools.test import evaluate
from resnet_imagenet.train.setup import load_data_net
from resnet_imagenet.train.trainer import TrainOptions, train


def write_lmdb(path: Path, n: int, shape: tuple[int, int, int], classes: int, seed: int = 0) -> None:
    """n raw Datums of HxWxC uint8 images, labels cycling over ``classes``."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(f"{i:08d}".encode(), encode_datum(rng.integers(0, 256, shape, dtype=np.uint8), i % classes))
    env.close()


def write_hdf5(folder: Path, n: int, seed: int = 0) -> None:
    """examples/hdf5_classification/data/{train,test}.txt, each listing one file of 4-feature rows, 2 classes."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with h5py.File(folder / f"{split}.h5", "w") as f:
            f["data"] = rng.standard_normal((n, 4)).astype(np.float32)
            f["label"] = (np.arange(n) % 2).astype(np.float32)
        (folder / f"{split}.txt").write_text(f"{folder / f'{split}.h5'}\n")


def needed_layers(net: caffe_pb2.NetParameter) -> list[str]:
    """Layer types of ``net`` that are not registered yet (data layers the net reads itself aside)."""
    return sorted({lp.type for lp in net.layer} - set(LAYERS) - set(DATA_LAYER_TYPES))


def skip_unless_registered(net: caffe_pb2.NetParameter) -> None:
    missing = needed_layers(net)
    if missing:
        pytest.skip(f"needs layer {', '.join(missing)} (issue 11, in progress)")


def train_one_step(
    net_param: caffe_pb2.NetParameter, tmp: Path, caplog, test_iter: int = 1, test_stages: tuple[str, ...] = ()
) -> float:
    """Train ``net_param`` one SGD step with a TEST pass; returns the iteration-0 loss (checked finite)."""
    solver = caffe_pb2.SolverParameter(base_lr=0.001, lr_policy="fixed", momentum=0.9, max_iter=1, display=1,
                                       snapshot_prefix=str(tmp / "snap/x"), random_seed=1)  # fmt: skip
    solver.net_param.CopyFrom(net_param)
    if any(r.phase == caffe_pb2.TEST for lp in net_param.layer for r in lp.include):
        solver.test_iter.append(test_iter)
        solver.test_interval = 1
        if test_stages:  # as the example's own solver: test_state { stage: ... }
            solver.test_state.add().stage.extend(test_stages)
    (tmp / "solver.prototxt").write_text(to_text(solver))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train(TrainOptions(solver=str(tmp / "solver.prototxt"), workers=0, gpu="cpu")) == 0
    lines = [r.getMessage() for r in caplog.records]
    loss = next(float(m.group(1)) for line in lines if (m := re.match(r"Iteration 0 .*loss = (\S+)", line)))
    assert math.isfinite(loss), loss
    assert (tmp / "snap/x_iter_1.caffemodel").is_file()
    return loss


def _mnist(tmp: Path) -> None:
    for split, n in (("train", 8), ("test", 4)):
        write_lmdb(tmp / f"examples/mnist/mnist_{split}_lmdb", n, (28, 28, 1), 10)


def _cifar(tmp: Path) -> None:
    for split, n in (("train", 8), ("test", 4)):
        write_lmdb(tmp / f"examples/cifar10/cifar10_{split}_lmdb", n, (32, 32, 3), 10)
    write_blobproto(np.full((1, 3, 32, 32), 120.0, np.float32), tmp / "examples/cifar10/mean.binaryproto")


def _siamese(tmp: Path) -> None:  # pairs of MNIST digits as 2 channels; the default backend is read as LMDB
    for split, n in (("train", 8), ("test", 4)):
        write_lmdb(tmp / f"examples/siamese/mnist_siamese_{split}_leveldb", n, (28, 28, 2), 2)


def _imagenet(tmp: Path, size: int) -> None:
    for split in ("train", "val"):
        write_lmdb(tmp / f"examples/imagenet/ilsvrc12_{split}_lmdb", 2, (size, size, 3), 1000)
    write_blobproto(np.full((1, 3, size, size), 110.0, np.float32), tmp / "data/ilsvrc12/imagenet_mean.binaryproto")


# prototxt under bvlc-caffe, data maker, the data layer's expected top shape in (TRAIN, TEST)
EXAMPLES = {
    "lenet": ("examples/mnist/lenet_train_test.prototxt", _mnist, ((64, 1, 28, 28), (100, 1, 28, 28))),
    "cifar10_quick": ("examples/cifar10/cifar10_quick_train_test.prototxt", _cifar, ((100, 3, 32, 32),) * 2),
    "cifar10_full": ("examples/cifar10/cifar10_full_train_test.prototxt", _cifar, ((100, 3, 32, 32),) * 2),
    "mnist_autoencoder": ("examples/mnist/mnist_autoencoder.prototxt", _mnist, ((100, 1, 28, 28), (100, 1, 28, 28))),
    "mnist_siamese": ("examples/siamese/mnist_siamese_train_test.prototxt", _siamese, ((64, 2, 28, 28),
                                                                                       (100, 2, 28, 28))),
}  # fmt: skip


# the TEST stage the example's own solver selects (mnist_autoencoder_solver.prototxt: test-on-test is one of two)
TEST_STAGES = {"mnist_autoencoder": ("test-on-test",)}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_builds_and_trains_a_step(name, bvlc_dir, tmp_path, monkeypatch, caplog) -> None:
    path, make, shapes = EXAMPLES[name]
    net = read_net(bvlc_dir / path)
    skip_unless_registered(net)
    make(tmp_path)
    monkeypatch.chdir(tmp_path)  # the prototxt's relative sources resolve from the cwd, as in Caffe
    stages = TEST_STAGES.get(name, ())
    for phase, shape in zip(("train", "test"), shapes):
        built = load_data_net(bvlc_dir / path, phase=phase, stages=stages if phase == "test" else ())
        # caffe: the top shape comes from the first Datum: channels too (MNIST is gray, no force_gray)
        assert built.input_shapes[built.data_layers[0].top[0]] == shape
    train_one_step(net, tmp_path, caplog, test_stages=stages)
    if name == "mnist_siamese":  # caffe: the two towers share every blob by param name (net.cpp AppendParam)
        saved = caffe_pb2.NetParameter.FromString((tmp_path / "snap/x_iter_1.caffemodel").read_bytes())
        blobs = {lp.name: [b.SerializeToString() for b in lp.blobs] for lp in saved.layer}
        for tower in ("conv1", "conv2", "ip1", "ip2", "feat"):  # each layer writes its blobs, sharers the owner's
            assert blobs[tower] and blobs[f"{tower}_p"] == blobs[tower], tower
        lines = [r.getMessage() for r in caplog.records]
        assert "Sharing parameters 'conv1_w' owned by layer 'conv1', param index 0" in lines


def test_hdf5_classification(bvlc_dir, tmp_path, monkeypatch, caplog) -> None:
    net = read_net(bvlc_dir / "examples/hdf5_classification/train_val.prototxt")
    skip_unless_registered(net)
    if "HDF5Data" not in LAYERS and "HDF5Data" not in DATA_LAYER_TYPES:
        pytest.skip("needs layer HDF5Data (issue 11, in progress)")
    write_hdf5(tmp_path / "examples/hdf5_classification/data", 20)
    monkeypatch.chdir(tmp_path)
    for phase in ("train", "test"):
        load_data_net(bvlc_dir / "examples/hdf5_classification/train_val.prototxt", phase=phase)
    train_one_step(net, tmp_path, caplog)


@pytest.mark.slow
@pytest.mark.parametrize("model, size", [("bvlc_googlenet", 224), ("bvlc_reference_caffenet", 256)])
def test_imagenet_model_builds_and_trains_a_step(model, size, bvlc_dir, tmp_path, monkeypatch, caplog) -> None:
    net = read_net(bvlc_dir / f"models/{model}/train_val.prototxt")
    skip_unless_registered(net)
    for lp in net.layer:  # the one change: a batch of 2, so a CPU step stays quick
        if lp.type == "Data":
            lp.data_param.batch_size = 2
    _imagenet(tmp_path, size)
    monkeypatch.chdir(tmp_path)
    for phase in ("train", "test"):
        load_data_net(net, phase=phase)
    train_one_step(net, tmp_path, caplog)
    if model == "bvlc_googlenet":  # caffe test prints the nine outputs of the three heads, by name
        (tmp_path / "train_val.prototxt").write_text(to_text(net))
        r = evaluate(tmp_path / "train_val.prototxt", tmp_path / "snap/x_iter_1.caffemodel", iterations=1,
                     num_workers=0)  # fmt: skip
        assert r.names == [f"loss{h}/{m}" for h in (1, 2, 3) for m in (f"loss{h}", "top-1", "top-5")]
        assert r.loss_weights == pytest.approx({"loss1/loss1": 0.3, "loss2/loss2": 0.3, "loss3/loss3": 1.0})
        weighted = sum(w * r[name] for name, w in r.loss_weights.items())
        assert r.loss == pytest.approx(weighted, rel=1e-5) and r.lines()[0] == f"Loss: {r.loss:.6g}"
