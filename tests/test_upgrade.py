"""Caffe's net upgrades (proto/upgrade.py): V0 and V1 prototxts and caffemodels load as their upgraded forms;
the upgrade_net_proto_* tools; a caffemodel of a net without learnable layers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from resnet_imagenet import cli
from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import array_to_blob
from resnet_imagenet.proto.text import PrototxtError, parse_text, read_net, read_solver, to_text, upgrade_net

V1 = caffe_pb2.V1LayerParameter

# The same net in today's format: what Caffe's upgrade of the V1 net below gives.
CURRENT = """
name: "tiny"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 } inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def _v1_net(weights: dict[str, list[np.ndarray]] | None = None) -> caffe_pb2.NetParameter:
    """CURRENT written the V1 way (input/input_dim, ``layers`` with enum types, blobs_lr/weight_decay)."""
    net = caffe_pb2.NetParameter(name="tiny", input=["data"], input_dim=[2, 3, 6, 6])
    conv = net.layers.add(name="conv1", type=V1.CONVOLUTION, bottom=["data"], top=["conv1"])
    conv.blobs_lr.extend([1, 2])
    conv.weight_decay.extend([1, 0])
    conv.convolution_param.num_output, conv.convolution_param.kernel_size[:], conv.convolution_param.pad[:] = (
        4,
        [3],
        [1],
    )
    net.layers.add(name="relu1", type=V1.RELU, bottom=["conv1"], top=["conv1"])
    pool = net.layers.add(name="pool1", type=V1.POOLING, bottom=["conv1"], top=["pool1"])
    pool.pooling_param.pool, pool.pooling_param.kernel_size, pool.pooling_param.stride = 0, 2, 2
    fc = net.layers.add(name="fc", type=V1.INNER_PRODUCT, bottom=["pool1"], top=["fc"])
    fc.blobs_lr.extend([1, 2])
    fc.weight_decay.extend([1, 0])
    fc.inner_product_param.num_output = 5
    net.layers.add(name="prob", type=V1.SOFTMAX, bottom=["fc"], top=["prob"])
    for lp in net.layers:
        for arr in (weights or {}).get(lp.name, []):
            lp.blobs.append(array_to_blob(arr, legacy=True))  # V1-era files store num/channels/height/width
    return net


def _weights() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "conv1": [rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
        "fc": [rng.standard_normal((5, 36)).astype(np.float32), rng.standard_normal(5).astype(np.float32)],
    }


def test_v1_prototxt_upgrades_to_the_current_form(caplog) -> None:
    v1 = _v1_net()
    with caplog.at_level(logging.INFO, logger="resnet_imagenet.proto.upgrade"):
        done = upgrade_net(v1, "old.prototxt")
    assert done == ["V1LayerParameter 'layers' -> 'layer'", "input fields -> Input layer"]
    assert [r.getMessage() for r in caplog.records] == [
        "Upgraded old.prototxt: V1LayerParameter 'layers' -> 'layer'; input fields -> Input layer"
    ]
    assert v1 == parse_text(CURRENT, caffe_pb2.NetParameter())
    assert upgrade_net(v1) == []  # already current: nothing to do, nothing logged


def test_v1_prototxt_and_caffemodel_load_with_the_same_outputs(tmp_path) -> None:
    w = _weights()
    (tmp_path / "v1.prototxt").write_text(to_text(_v1_net()))
    assert "layers {" in (tmp_path / "v1.prototxt").read_text() and "type: CONVOLUTION" in to_text(_v1_net())
    (tmp_path / "v1.caffemodel").write_bytes(_v1_net(w).SerializeToString())
    old = load_net(tmp_path / "v1.prototxt", weights=tmp_path / "v1.caffemodel")
    new = load_net(parse_text(CURRENT, caffe_pb2.NetParameter()))
    for name, arrays in w.items():  # the upgraded form, loaded from blobs set directly
        for t, a in zip(new.layers[name].blobs(), arrays):
            t.data.copy_(torch.from_numpy(a))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(old(x)["prob"], new(x)["prob"])
    assert [(n, i, lr, dm) for n, i, _, lr, dm in old.learnable()] == [
        (n, i, lr, dm) for n, i, _, lr, dm in new.learnable()
    ]
    assert [lr for _, _, _, lr, _ in old.learnable()] == [1, 2, 1, 2]
    # a V1 caffemodel also loads into a current prototxt, and a V1 NetParameter given in code is upgraded
    new2 = load_net(parse_text(CURRENT, caffe_pb2.NetParameter()), weights=tmp_path / "v1.caffemodel")
    assert torch.equal(new2(x)["prob"], new(x)["prob"])
    assert torch.equal(load_net(_v1_net(), weights=tmp_path / "v1.caffemodel")(x)["prob"], new(x)["prob"])


def test_upgrade_tools_write_the_upgraded_files(tmp_path) -> None:
    w = _weights()
    (tmp_path / "v1.prototxt").write_text(to_text(_v1_net()))
    (tmp_path / "v1.caffemodel").write_bytes(_v1_net(w).SerializeToString())
    assert cli.main(["upgrade_net_proto_text", str(tmp_path / "v1.prototxt"), str(tmp_path / "up.prototxt")]) == 0
    assert parse_text((tmp_path / "up.prototxt").read_text(), caffe_pb2.NetParameter()) == parse_text(
        CURRENT, caffe_pb2.NetParameter()
    )
    assert cli.main(["upgrade_net_proto_binary", str(tmp_path / "v1.caffemodel"), str(tmp_path / "up.caffemodel")]) == 0
    up = caffe_pb2.NetParameter.FromString((tmp_path / "up.caffemodel").read_bytes())
    assert not up.layers and [lp.type for lp in up.layer] == ["Input", "Convolution", "ReLU", "Pooling"] + [
        "InnerProduct",
        "Softmax",
    ]
    old = _v1_net(w)
    for lp in up.layer[1:]:  # blobs carried over unchanged, byte for byte
        src = next(v for v in old.layers if v.name == lp.name)
        assert [b.SerializeToString() for b in lp.blobs] == [b.SerializeToString() for b in src.blobs]
    # refuses to overwrite its input, and leaves it as it was
    before = (tmp_path / "v1.prototxt").read_bytes()
    assert cli.main(["upgrade_net_proto_text", str(tmp_path / "v1.prototxt"), str(tmp_path / "v1.prototxt")]) == 1
    assert (tmp_path / "v1.prototxt").read_bytes() == before


def test_v0_layers_and_padding_layers_upgrade() -> None:
    text = """
    name: "v0" input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
    layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
    layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 5 stride: 1 biasterm: false
                     blobs_lr: 1 weight_decay: 1 weight_filler { type: "gaussian" std: 0.01 } }
             bottom: "pad1" top: "conv1" }
    layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 } bottom: "conv1" top: "pool1" }
    layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.3 } bottom: "pool1" top: "pool1" }
    """
    net = parse_text(text, caffe_pb2.NetParameter())
    assert upgrade_net(net)[:2] == ["V0LayerParameter -> V1", "V1LayerParameter 'layers' -> 'layer'"]
    want = parse_text(
        """
        name: "v0"
        layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
        layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 decay_mult: 1 }
                convolution_param { num_output: 4 bias_term: false pad: 2 kernel_size: 5 stride: 1
                                    weight_filler { type: "gaussian" std: 0.01 } } }
        layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
                pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
        layer { name: "drop" type: "Dropout" bottom: "pool1" top: "pool1" dropout_param { dropout_ratio: 0.3 } }
        """,
        caffe_pb2.NetParameter(),
    )
    assert net == want
    assert load_net(net).blob_shapes["pool1"] == (1, 4, 4, 4)  # the padding layer's pad reached conv1
    bad = parse_text('input: "x" layers { layer { name: "r" type: "relu" num_output: 3 } bottom: "x" top: "x" }',
                     caffe_pb2.NetParameter())  # fmt: skip
    with pytest.raises(PrototxtError, match="V0 layer 'r': type 'relu' has no parameter num_output"):
        upgrade_net(bad)


def test_transform_batchnorm_and_solver_upgrades(tmp_path) -> None:
    net = parse_text(
        'layers { name: "d" type: DATA top: "x" data_param { source: "db" batch_size: 4 crop_size: 7 mirror: true '
        'scale: 0.5 mean_file: "m.binaryproto" } }',
        caffe_pb2.NetParameter(),
    )
    upgrade_net(net)
    lp = net.layer[0]
    assert lp.type == "Data" and not lp.data_param.HasField("crop_size") and lp.data_param.batch_size == 4
    t = lp.transform_param
    assert (t.crop_size, t.mirror, t.scale, t.mean_file) == (7, True, 0.5, "m.binaryproto")
    bn = parse_text('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 decay_mult: 1 } '
                    'param { lr_mult: 1 } }', caffe_pb2.NetParameter())  # fmt: skip
    assert upgrade_net(bn) == ["BatchNorm param lr_mult/decay_mult -> 0"]
    assert [(s.lr_mult, s.decay_mult) for s in bn.layer[0].param] == [(0, 0)] * 3
    (tmp_path / "s.prototxt").write_text('net: "n" base_lr: 0.1 solver_type: NESTEROV')
    s = read_solver(tmp_path / "s.prototxt")
    assert s.type == "Nesterov" and not s.HasField("solver_type")
    (tmp_path / "both.prototxt").write_text('net: "n" solver_type: ADAM type: "SGD"')
    with pytest.raises(PrototxtError, match="both.prototxt: give solver_type"):
        read_solver(tmp_path / "both.prototxt")
    (tmp_path / "mixed.prototxt").write_text('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')
    with pytest.raises(PrototxtError, match="mixed.prototxt: the net has both 'layer' and the deprecated 'layers'"):
        read_net(tmp_path / "mixed.prototxt")


def test_caffemodel_of_a_net_without_learnable_layers(tmp_path) -> None:
    text = """
    layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
    layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }
    layer { name: "pool" type: "Pooling" bottom: "r" top: "p" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
    """
    net = load_net(parse_text(text, caffe_pb2.NetParameter()))
    net.save_caffemodel(tmp_path / "none.caffemodel")
    saved = caffe_pb2.NetParameter.FromString((tmp_path / "none.caffemodel").read_bytes())
    assert [lp.name for lp in saved.layer] == ["in", "relu", "pool"] and not any(lp.blobs for lp in saved.layer)
    again = load_net(parse_text(text, caffe_pb2.NetParameter()), weights=tmp_path / "none.caffemodel")
    again.save_caffemodel(tmp_path / "again.caffemodel")
    assert (tmp_path / "again.caffemodel").read_bytes() == (tmp_path / "none.caffemodel").read_bytes()
