"""Data layers: DummyData, HDF5Data (real .h5 files written with h5py), HDF5Output, MemoryData, WindowData's
refusal; and BVLC's hdf5_classification example nets building in both phases and taking a forward + backward step.
VALUE_CASES / GRAD_CASES follow the shared layer-test convention: each case here is a check taking tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from resnet_imagenet.net import layers as L
from resnet_imagenet.net.net import CaffeNet, load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError, parse_text

REPO = Path(__file__).resolve().parents[1]


def layer(text: str, bottoms=()) -> L.CaffeLayer:
    return L.build_layer(parse_text(text, caffe_pb2.LayerParameter()), list(bottoms))


def write_h5(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def h5_source(tmp_path: Path, *files: Path) -> Path:
    src = tmp_path / "list.txt"
    src.write_text("\n".join(str(f) for f in files) + "\n")
    return src


def hdf5_layer(src: Path, batch: int, shuffle: bool = False) -> L.CaffeLayer:
    sh = " shuffle: true" if shuffle else ""
    return layer(
        f'name: "d" type: "HDF5Data" top: "data" top: "label" '
        f'hdf5_data_param {{ source: "{src}" batch_size: {batch}{sh} }}'
    )


ROWS = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)


# --- DummyData --------------------------------------------------------------------------------------------------


def dummy_constant_and_shapes(tmp_path):
    m = layer(
        'name: "d" type: "DummyData" top: "a" top: "b" top: "c" dummy_data_param { '
        "shape { dim: 2 dim: 3 } shape { dim: 4 } shape { dim: 1 dim: 1 dim: 2 } "
        'data_filler { type: "constant" value: 3 } data_filler { } data_filler { type: "gaussian" mean: 2 std: 0 } }'
    )
    assert m.top_shapes() == [(2, 3), (4,), (1, 1, 2)]
    a, b, c = m()
    assert torch.equal(a, torch.full((2, 3), 3.0)) and torch.equal(b, torch.zeros(4))  # default constant 0
    assert torch.equal(c, torch.full((1, 1, 2), 2.0))  # gaussian with std 0: its mean


def dummy_legacy_fields_one_filler(tmp_path):
    # caffe's legacy num/channels/height/width, each once or once per top; one filler for all tops
    m = layer(
        'name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { num: 2 channels: 3 channels: 1 '
        'height: 4 width: 5 data_filler { type: "uniform" min: -1 max: 1 } }'
    )
    assert m.top_shapes() == [(2, 3, 4, 5), (2, 1, 4, 5)]
    first, second = m()[0], m()[0]
    assert first.abs().max() <= 1 and not torch.equal(first, second)  # refilled at every forward


def dummy_refusals(tmp_path):
    with pytest.raises(PrototxtError, match="layer 'd'.*shape or num/channels"):
        layer('name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 1 } num: 1 }')
    with pytest.raises(PrototxtError, match="layer 'd'.*shape once, or once per top"):
        layer('name: "d" type: "DummyData" top: "a" top: "b" top: "c" dummy_data_param { shape { } shape { } }')
    with pytest.raises(PrototxtError, match="layer 'd'.*unsupported filler"):
        layer('name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 1 } data_filler { type: "x" } }')


# --- HDF5Data ---------------------------------------------------------------------------------------------------


def hdf5_rows_in_order_across_files(tmp_path):
    f1 = write_h5(tmp_path / "a.h5", data=ROWS, label=np.arange(5.0))
    f2 = write_h5(tmp_path / "b.h5", data=ROWS[:2] + 100, label=np.array([10.0, 11.0]))
    m = hdf5_layer(h5_source(tmp_path, f1, f2), batch=3)
    assert m.top_shapes() == [(3, 2, 3), (3,)]
    labels = [m()[1].tolist() for _ in range(4)]
    # caffe: HDF5DataLayer::Next -- rows in order, then the next file, then around to the first
    assert labels == [[0, 1, 2], [3, 4, 10], [11, 0, 1], [2, 3, 4]]
    data, _ = hdf5_layer(h5_source(tmp_path, f1, f2), batch=3)()
    assert data.dtype == torch.float32 and torch.equal(data, torch.from_numpy(ROWS[:3]))


def hdf5_shuffle_permutes_each_pass(tmp_path):
    f = write_h5(tmp_path / "a.h5", data=ROWS, label=np.arange(5.0))
    torch.manual_seed(0)
    m = hdf5_layer(h5_source(tmp_path, f), batch=5, shuffle=True)
    passes = [m()[1].tolist() for _ in range(3)]
    assert all(sorted(p) == [0, 1, 2, 3, 4] for p in passes) and len({tuple(p) for p in passes}) > 1
    data, label = hdf5_layer(h5_source(tmp_path, f), batch=5, shuffle=True)()
    assert torch.equal(data, torch.from_numpy(ROWS[label.long().numpy()]))  # rows stay paired


def hdf5_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="layer 'd'.*nope.txt"):
        hdf5_layer(tmp_path / "nope.txt", 2)
    with pytest.raises(PrototxtError, match="at least 1 HDF5 file"):
        hdf5_layer(h5_source(tmp_path), 2)
    bad = write_h5(tmp_path / "bad.h5", data=ROWS, target=np.arange(5.0))
    with pytest.raises(PrototxtError, match="no dataset 'label'"):
        hdf5_layer(h5_source(tmp_path, bad), 2)
    odd = write_h5(tmp_path / "odd.h5", data=ROWS, label=np.arange(4.0))
    with pytest.raises(PrototxtError, match="one positive row count"):
        hdf5_layer(h5_source(tmp_path, odd), 2)


def hdf5_output_appends_each_forward(tmp_path):
    out = tmp_path / "out.h5"
    m = layer(f'name: "o" type: "HDF5Output" hdf5_output_param {{ file_name: "{out}" }}', [(2, 3), (2,)])
    assert m.top_shapes() == [] and not out.exists()  # nothing is written before a forward
    x = torch.arange(12.0).reshape(4, 3)
    assert m(x[:2], torch.tensor([0.0, 1.0])) == ()
    m(x[2:], torch.tensor([2.0, 3.0]))
    with h5py.File(out, "r") as f:
        # caffe: saved as num x channels x height x width floats, datasets "data" and "label"
        np.testing.assert_array_equal(f["data"][()], x.numpy().reshape(4, 3, 1, 1))
        np.testing.assert_array_equal(f["label"][()], np.arange(4.0).reshape(4, 1, 1, 1))
        assert f["data"].dtype == np.float32
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]  # no temporary file left


def memory_data_is_a_net_input(tmp_path):
    text = (
        'layer { name: "m" type: "MemoryData" top: "data" top: "label" '
        "memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } } "
        'layer { name: "f" type: "Flatten" bottom: "data" top: "flat" }'
    )
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()))
    assert net.input_names == ["data", "label"]
    assert net.input_shapes == {"data": (2, 1, 2, 3), "label": (2,)}  # caffe: label shape (batch_size,)
    x = torch.randn(2, 1, 2, 3)
    assert torch.equal(net(x, torch.zeros(2))["flat"], x.reshape(2, 6))


def window_data_is_refused(tmp_path):
    with pytest.raises(PrototxtError, match="layer 'w'.*WindowData is not supported: it reads R-CNN window files"):
        layer('name: "w" type: "WindowData" top: "data" top: "label" window_data_param { source: "w.txt" }')


def _tiny_sources(tmp_path: Path) -> tuple[Path, Path]:
    """A one-record LMDB and a one-image list file, both of a real 3-channel 8x8 image (label 1)."""
    import cv2
    import lmdb

    from resnet_imagenet.data.datum import encode_datum

    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    db = tmp_path / "db"
    with lmdb.open(str(db), map_size=1 << 20) as env, env.begin(write=True) as txn:
        txn.put(b"00000000_a.png", encode_datum(img, 1))
    cv2.imwrite(str(tmp_path / "a.png"), img)
    (tmp_path / "list.txt").write_text("a.png 1\n")
    return db, tmp_path / "list.txt"


def _source_net(kind: str, source: Path, extra: str = "") -> str:
    param = "data_param { backend: LMDB" if kind == "Data" else "image_data_param {"
    return (
        f'layer {{ name: "d" type: "{kind}" top: "x" top: "y" transform_param {{ crop_size: 4 }} '
        f'{param} source: "{source}" batch_size: 2 }} }} ' + extra
    )


def input_is_a_net_input(tmp_path):
    text = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 1 dim: 1 } } }'
    text += ' layer { name: "f" type: "Flatten" bottom: "x" top: "flat" }'
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()))
    assert net.input_names == ["x"] and net.input_shapes == {"x": (2, 3, 1, 1)}
    x = torch.randn(2, 3, 1, 1)
    assert torch.equal(net(x)["flat"], x.reshape(2, 3))


def data_and_image_data_tops_are_batch_x_crop(tmp_path):
    db, listfile = _tiny_sources(tmp_path)
    for kind, source in (("Data", db), ("ImageData", listfile)):
        net = CaffeNet(parse_text(_source_net(kind, source), caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
        # caffe: data_layer.cpp / image_data_layer.cpp -- top (batch_size, channels, crop, crop), label (batch_size,)
        assert net.input_names == ["x", "y"]
        assert net.input_shapes == {"x": (2, 3, 4, 4), "y": (2,)}, kind


VALUE_CASES: dict[str, list] = {
    "Input": [input_is_a_net_input],
    "Data": [data_and_image_data_tops_are_batch_x_crop],
    "ImageData": [data_and_image_data_tops_are_batch_x_crop],
    "DummyData": [dummy_constant_and_shapes, dummy_legacy_fields_one_filler, dummy_refusals],
    "HDF5Data": [hdf5_rows_in_order_across_files, hdf5_shuffle_permutes_each_pass, hdf5_refusals],
    "HDF5Output": [hdf5_output_appends_each_forward],
    "MemoryData": [memory_data_is_a_net_input],
    "WindowData": [window_data_is_refused],
}


# --- no backward: caffe's data layers have nothing to propagate to -------------------------------------------------

_REGRESS = (
    'layer {{ name: "fc" type: "InnerProduct" bottom: "{x}" top: "fc" inner_product_param {{ num_output: 1 '
    'weight_filler {{ type: "gaussian" std: 1 }} }} }} '
    'layer {{ name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "{y}" top: "loss" }}'
)


def _step(net: CaffeNet) -> dict[str, torch.Tensor]:
    out = net(blobs=[*net.blob_shapes])
    net.loss(out).backward()
    return out


def dummy_tops_take_no_gradient(tmp_path):
    text = (
        'layer { name: "d" type: "DummyData" top: "x" top: "y" dummy_data_param { shape { dim: 4 dim: 3 } '
        'shape { dim: 4 dim: 1 } data_filler { type: "gaussian" } } } ' + _REGRESS.format(x="x", y="y")
    )
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    out = _step(net)
    assert not out["x"].requires_grad and not out["y"].requires_grad
    assert net.layers["fc"].weight.grad is not None  # the layers above still learn


def hdf5_tops_take_no_gradient(tmp_path):
    f = write_h5(tmp_path / "a.h5", data=ROWS.reshape(5, 6), label=np.arange(5.0).reshape(5, 1))
    text = (
        f'layer {{ name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ '
        f'source: "{h5_source(tmp_path, f)}" batch_size: 2 }} }} ' + _REGRESS.format(x="data", y="label")
    )
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    out = _step(net)
    assert not out["data"].requires_grad and net.layers["fc"].weight.grad is not None


def hdf5_output_passes_no_gradient(tmp_path):
    m = layer(f'name: "o" type: "HDF5Output" hdf5_output_param {{ file_name: "{tmp_path / "o.h5"}" }}', [(2, 1), (2,)])
    x = torch.ones(2, 1, requires_grad=True)
    assert m(x * 2, torch.zeros(2)) == ()  # no top: nothing for a loss to reach x through


def memory_data_inputs_are_the_callers(tmp_path):
    memory_data_is_a_net_input(tmp_path)  # the net takes the caller's tensors as they are; no backward into them
    text = (
        'layer { name: "m" type: "MemoryData" top: "x" top: "y" memory_data_param { batch_size: 4 channels: 3 '
        "height: 1 width: 1 } } " + _REGRESS.format(x="x", y="y")
    )
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    out = net(torch.randn(4, 3, 1, 1), torch.randn(4))
    net.loss(out).backward()
    assert net.layers["fc"].weight.grad is not None


def input_gradient_reaches_the_caller(tmp_path):
    text = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 3 dim: 2 } } }'
    text += _REGRESS.format(x="x", y="y").replace('bottom: "y"', 'bottom: "fc"')
    text = text.replace('type: "EuclideanLoss" bottom: "fc" bottom: "fc"', 'type: "Reduction" bottom: "fc"')
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN).double()
    # the net input is the caller's tensor: its gradient is the net's, checked against finite differences
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: net(t)["loss"], (x,))


def data_tops_are_fed_and_take_no_gradient(tmp_path):
    db, listfile = _tiny_sources(tmp_path)
    for kind, source in (("Data", db), ("ImageData", listfile)):
        text = _source_net(
            kind,
            source,
            _REGRESS.format(x="x", y="y")
            .replace('"EuclideanLoss" bottom: "fc" bottom: "y"', '"SoftmaxWithLoss" bottom: "fc" bottom: "y"')
            .replace("num_output: 1", "num_output: 2"),
        )
        net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
        x = torch.rand(2, 3, 4, 4) * 255  # what DataFeed feeds: float pixels, labels as int64
        out = net(x, torch.tensor([0, 1]))
        net.loss(out).backward()
        assert not x.requires_grad and net.layers["fc"].weight.grad is not None, kind


GRAD_CASES: dict[str, list] = {
    "Input": [input_gradient_reaches_the_caller],
    "Data": [data_tops_are_fed_and_take_no_gradient],
    "ImageData": [data_tops_are_fed_and_take_no_gradient],
    "DummyData": [dummy_tops_take_no_gradient],
    "HDF5Data": [hdf5_tops_take_no_gradient],
    "HDF5Output": [hdf5_output_passes_no_gradient],
    "MemoryData": [memory_data_inputs_are_the_callers],
    "WindowData": [window_data_is_refused],  # refused at build: there is no layer to differentiate
}


def _flat(cases: dict) -> list:
    return [pytest.param(c, id=f"{k}-{c.__name__}") for k, cs in cases.items() for c in cs]


@pytest.mark.parametrize("check", _flat(VALUE_CASES))
def test_forward_matches_caffe(check, tmp_path):
    check(tmp_path)


@pytest.mark.parametrize("check", _flat(GRAD_CASES))
def test_no_backward_into_data_layers(check, tmp_path):
    check(tmp_path)


# --- BVLC's hdf5_classification example, unchanged but for its data source ------------------------------------------


def bvlc_examples() -> Path | None:
    """../shared/bvlc-caffe, or beside $RESNET_IMAGENET_REFERENCE."""
    ref = os.environ.get("RESNET_IMAGENET_REFERENCE")
    for c in [REPO.parent / "shared" / "bvlc-caffe", *([Path(ref).parent / "bvlc-caffe"] if ref else [])]:
        if (c / "SOURCES.md").is_file():
            return c
    return None


@pytest.mark.parametrize("name", ["train_val.prototxt", "nonlinear_train_val.prototxt"])
def test_bvlc_hdf5_classification_builds_and_steps_in_both_phases(name, tmp_path, monkeypatch):
    root = bvlc_examples()
    if root is None:
        pytest.skip("BVLC Caffe's example prototxts not found (../shared/bvlc-caffe)")
    # the example's own layout: sources relative to the Caffe root, as Caffe resolves them (the working directory)
    data = tmp_path / "examples" / "hdf5_classification" / "data"
    data.mkdir(parents=True)
    r = np.random.default_rng(0)
    for split in ("train", "test"):
        x = r.normal(size=(12, 4)).astype(np.float32)  # the example's sklearn set has 4 features, 2 classes
        write_h5(data / f"{split}.h5", data=x, label=(x[:, 0] > 0).astype(np.float32))
        (data / f"{split}.txt").write_text(f"examples/hdf5_classification/data/{split}.h5\n")
    monkeypatch.chdir(tmp_path)
    for phase in ("train", "test"):
        net = load_net(root / "examples" / "hdf5_classification" / name, phase=phase)
        assert net.input_names == [] and net.blob_shapes["data"] == (10, 4)
        out = net()
        loss = net.loss(out)
        assert loss.item() > 0 and torch.isfinite(loss)
        loss.backward()
        assert net.layers["fc1"].weight.grad.abs().sum() > 0
        if phase == "test":
            assert 0 <= out["accuracy"].item() <= 1
