"""CaffeNet: blob routing, phases, outputs, BN+Scale fusion, caffemodel I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnet_imagenet.net.net import CaffeNet, load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import array_to_blob
from resnet_imagenet.proto.text import PrototxtError, parse_text, read_net

SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" param { lr_mult: 1 decay_mult: 1 }
        param { lr_mult: 2 decay_mult: 0 } inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" include { phase: TRAIN } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" include { phase: TEST } }
"""


def small(phase: str = "test") -> CaffeNet:
    return load_net(parse_text(SMALL, caffe_pb2.NetParameter()), phase=phase)


def randomize(net: CaffeNet) -> None:
    g = torch.Generator().manual_seed(1)
    for m in net.layers.values():
        for t in m.blobs():
            with torch.no_grad():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def test_phases_outputs_and_loss_weights():
    test, train = small("test"), small("train")
    assert test.output_names == ["label", "prob"] and not test.training
    assert train.output_names == ["loss"] and train.training
    assert train.loss_weights == {"loss": 1.0} and test.loss_weights == {}
    assert [(n, i, lr, dm) for n, i, _, lr, dm in train.learnable()] == [
        ("conv1", 0, 1.0, 1.0), ("conv1", 1, 1.0, 1.0), ("scale1", 0, 1.0, 1.0), ("scale1", 1, 1.0, 1.0),
        ("fc", 0, 1.0, 1.0), ("fc", 1, 2.0, 0.0),
    ]  # fmt: skip
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 4])
    loss = train(x, y)["loss"]
    assert loss.shape == () and loss.item() > 0


def test_fused_batchnorm_scale_equals_separate_layers():
    net = small("test")
    randomize(net)
    x = torch.randn(2, 3, 8, 8)
    fused = net(x, blobs=["fc"])["fc"]
    bn, sc = net.layers["bn1"], net.layers["scale1"]
    conv = net.layers["conv1"](x)
    by_hand = torch.relu(sc(bn(conv)))
    pooled = by_hand.mean((2, 3), keepdim=True)
    torch.testing.assert_close(fused, net.layers["fc"](pooled))


def test_intermediate_blob_request_keeps_caffe_inplace_meaning():
    net = small("test")
    randomize(net)
    out = net(torch.randn(2, 3, 8, 8), blobs=["conv1", "pool1"])
    assert out["conv1"].min().item() >= 0  # in-place ReLU overwrote conv1, as in Caffe
    torch.testing.assert_close(out["pool1"], out["conv1"].mean((2, 3), keepdim=True))


def test_caffemodel_round_trip_is_byte_identical(tmp_path):
    net = small("test")
    randomize(net)
    a = tmp_path / "a.caffemodel"
    net.save_caffemodel(a)
    other = small("train")
    other.load_caffemodel(a)
    b = tmp_path / "b.caffemodel"
    other.save_caffemodel(b)
    pa, pb = caffe_pb2.NetParameter(), caffe_pb2.NetParameter()
    pa.ParseFromString(a.read_bytes())
    pb.ParseFromString(b.read_bytes())
    blobs_a = {lp.name: [bl.SerializeToString() for bl in lp.blobs] for lp in pa.layer if lp.blobs}
    blobs_b = {lp.name: [bl.SerializeToString() for bl in lp.blobs] for lp in pb.layer if lp.blobs}
    assert blobs_a == blobs_b and set(blobs_a) == {"conv1", "bn1", "scale1", "fc"}
    assert [tuple(bl.shape.dim) for bl in next(lp for lp in pa.layer if lp.name == "bn1").blobs] == [(4,), (4,), (1,)]


def test_legacy_4d_blobs_load_and_save_back_legacy(tmp_path):
    net = small("test")
    src = net.to_proto(with_blobs=True)
    fc = next(lp for lp in src.layer if lp.name == "fc")
    w = np.arange(20, dtype=np.float32).reshape(5, 4)
    fc.blobs[0].CopyFrom(array_to_blob(w, legacy=True))  # stored as 1 x 1 x 5 x 4
    path = tmp_path / "legacy.caffemodel"
    path.write_bytes(src.SerializeToString())
    net.load_caffemodel(path)
    np.testing.assert_array_equal(net.layers["fc"].weight.detach().numpy(), w)
    out = tmp_path / "again.caffemodel"
    net.save_caffemodel(out)
    again = caffe_pb2.NetParameter()
    again.ParseFromString(out.read_bytes())
    blob = next(lp for lp in again.layer if lp.name == "fc").blobs[0]
    assert blob.SerializeToString() == fc.blobs[0].SerializeToString()


def test_weights_mismatch_names_layer_and_shapes(tmp_path):
    src = small("test").to_proto(with_blobs=True)
    fc = next(lp for lp in src.layer if lp.name == "fc")
    fc.blobs[0].CopyFrom(array_to_blob(np.zeros((7, 4), np.float32)))
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(src.SerializeToString())
    with pytest.raises(ValueError, match=r"bad.caffemodel: layer 'fc' blob 0: shape mismatch: .*\(7, 4\).*\(5, 4\)"):
        small("test").load_caffemodel(path)
    (tmp_path / "junk.caffemodel").write_bytes(b"\x00\x01not a proto")
    with pytest.raises(ValueError, match="junk.caffemodel"):
        small("test").load_caffemodel(tmp_path / "junk.caffemodel")


def test_legacy_input_fields_and_bad_bottoms():
    net = CaffeNet(read_net_text('input: "data" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 3 '
                                 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }'))  # fmt: skip
    assert net.input_shapes == {"data": (1, 2, 3, 3)}
    with pytest.raises(PrototxtError, match="layer 'r': unknown bottom blob 'nope'"):
        CaffeNet(read_net_text('layer { name: "r" type: "ReLU" bottom: "nope" top: "r" }'))


def read_net_text(text: str) -> caffe_pb2.NetParameter:
    from resnet_imagenet.proto.text import upgrade_net

    net = parse_text(text, caffe_pb2.NetParameter())
    upgrade_net(net)
    return net


def test_reference_prototxts_parse_and_build(reference_dir):
    for path in sorted(reference_dir.rglob("*.prototxt")):
        if "solver" in path.name:
            continue
        net = read_net(path)
        assert net.layer, path
    deploy = load_net(reference_dir / "deep-residual-networks/prototxt/ResNet-50-deploy.prototxt")
    # Kaiming He's ResNet-50: torchvision's 25,557,032 plus conv1's 64-element bias
    assert sum(p.numel() for _, _, p, _, _ in deploy.learnable()) == 25_557_096
    assert deploy.blob_shapes["pool1"] == (1, 64, 56, 56)
    assert deploy.output_names == ["prob"]


def test_inplace_relu_is_safe_for_backward_and_split_aliases():
    text = """
    layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 2 dim: 3 dim: 3 } } }
    layer { name: "c0" type: "Convolution" bottom: "data" top: "y"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" } } }
    layer { name: "c1" type: "Convolution" bottom: "y" top: "a"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" } } }
    layer { name: "r" type: "ReLU" bottom: "y" top: "y" }
    layer { name: "s" type: "Split" bottom: "a" top: "a1" top: "a2" }
    layer { name: "r2" type: "ReLU" bottom: "a1" top: "a1" }
    layer { name: "sum" type: "Eltwise" bottom: "y" bottom: "a1" bottom: "a2" top: "out" }
    """
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    assert not net.layers["r"].inplace  # c1 read y first (and saved it for its weight gradient)
    assert not net.layers["r2"].inplace  # a1 aliases a2
    x = torch.randn(2, 2, 3, 3)
    out = net(x, blobs=["y", "a", "a2", "out"])
    torch.testing.assert_close(out["a2"], out["a"])  # a2 is not rectified
    out["out"].sum().backward()
    w0, w1 = net.layers["c0"].weight, net.layers["c1"].weight
    y_pre = torch.nn.functional.conv2d(x, w0.detach())
    a = torch.nn.functional.conv2d(y_pre, w1.detach())
    torch.testing.assert_close(out["out"], torch.relu(y_pre) + torch.relu(a) + a)
    assert w0.grad is not None and w1.grad is not None


def test_residual_sum_adds_in_place_only_where_safe():
    text = """
    layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 2 dim: 3 dim: 3 } } }
    layer { name: "a" type: "Convolution" bottom: "data" top: "a"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" } } }
    layer { name: "b" type: "Convolution" bottom: "a" top: "b"
            convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" } } }
    layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "s" eltwise_param { coeff: 2 coeff: 1 } }
    layer { name: "sum2" type: "Eltwise" bottom: "s" bottom: "data" top: "t" }
    """
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    # a is also read by conv b (which keeps it for backward); b is read only by the sum; data is an input
    assert net._inplace_sum == {"sum": 1, "sum2": 0}
    x = torch.randn(2, 2, 3, 3, requires_grad=True)
    out = net(x, blobs=["a", "b", "t"])  # b requested: that sum runs out of place
    torch.testing.assert_close(out["t"], 2 * out["a"] + out["b"] + x)
    fast = net(x)["t"]
    torch.testing.assert_close(fast, out["t"])
    fast.sum().backward()
    w = net.layers["b"].weight
    assert x.grad is not None and w.grad is not None


def test_learnable_blob_index_counts_only_present_blobs_and_state_stages_are_kept():
    text = """
    state { stage: "deploy" }
    layer { name: "in" type: "Input" top: "x" top: "k" input_param { shape { dim: 2 dim: 3 } shape { dim: 3 } } }
    layer { name: "s" type: "Scale" bottom: "x" bottom: "k" top: "y" param { lr_mult: 5 decay_mult: 0 }
            scale_param { bias_term: true } }
    layer { name: "r" type: "ReLU" bottom: "y" top: "y" include { stage: "deploy" } }
    """
    net = load_net(parse_text(text, caffe_pb2.NetParameter()), phase="test")
    # caffe: a Scale with a second bottom has one blob, the bias, and param[0] is its spec
    assert [(n, i, lr, dm) for n, i, _, lr, dm in net.learnable()] == [("s", 0, 5.0, 0.0)]
    assert "r" in net.layers  # the prototxt's own state { stage } still selects layers


@pytest.mark.parametrize(
    ("bn_top", "scale_top", "extra", "fused"),
    [
        ("b", "b", "", True),  # Scale in place on the BatchNorm's own top
        ("b", "s", "", True),  # out of place, and the Scale is the only reader of b
        ("b", "s", 'layer { name: "r" type: "ReLU" bottom: "b" top: "rb" }', False),  # b is read again
        ("c", "s", "", False),  # BatchNorm in place: the blob c is also read by the BatchNorm itself
    ],
)
def test_batchnorm_scale_fusion_needs_the_scale_to_be_the_only_reader(bn_top, scale_top, extra, fused):
    text = f"""
    layer {{ name: "in" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 2 dim: 3 dim: 3 }} }} }}
    layer {{ name: "conv" type: "Convolution" bottom: "data" top: "c"
            convolution_param {{ num_output: 2 kernel_size: 1 weight_filler {{ type: "gaussian" }} }} }}
    layer {{ name: "bn" type: "BatchNorm" bottom: "c" top: "{bn_top}" }}
    layer {{ name: "sc" type: "Scale" bottom: "{bn_top}" top: "{scale_top}" scale_param {{ bias_term: true }} }}
    {extra}
    """
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TEST)
    assert net._fused_scale == ({"bn": "sc"} if fused else {})
    randomize(net)
    x = torch.randn(2, 2, 3, 3)
    bn, sc = net.layers["bn"], net.layers["sc"]
    torch.testing.assert_close(net(x)[scale_top], sc(bn(net.layers["conv"](x))))


def test_a_repeated_layer_name_is_kept_apart_unless_the_layer_has_blobs(caplog):
    # caffe accepts repeated layer names (BVLC's mnist_autoencoder has two layers "loss")
    text = (
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } } '
        'layer { name: "a" type: "ReLU" bottom: "x" top: "r" } '
        'layer { name: "a" type: "Sigmoid" bottom: "x" top: "s" }'
    )
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()))
    x = torch.tensor([[-1.0, 0.0, 2.0], [3.0, -4.0, 0.5]])
    out = net(x)
    assert torch.equal(out["r"], x.clamp(min=0)) and torch.allclose(out["s"], 1 / (1 + torch.exp(-x)))
    assert "layer 'a': the name is used before; this one is called 'a#1' here" in caplog.text
    with pytest.raises(PrototxtError, match="layer 'a': duplicate name on a layer with learnable blobs"):
        CaffeNet(
            parse_text(
                text.replace('type: "Sigmoid"', 'type: "InnerProduct" inner_product_param { num_output: 1 }'),
                caffe_pb2.NetParameter(),
            )
        )
