"""Layer semantics against Caffe's formulas, computed by hand or by direct numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resnet_imagenet.net import layers as L
from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError, parse_text


def layer(text: str) -> caffe_pb2.LayerParameter:
    return parse_text(text, caffe_pb2.LayerParameter())


def net_from(text: str, phase=caffe_pb2.TEST) -> CaffeNet:
    return CaffeNet(parse_text(text, caffe_pb2.NetParameter()), phase)


def caffe_pool_ref(x: np.ndarray, k: int, s: int, p: int, is_max: bool, ceil: bool = True) -> np.ndarray:
    """Caffe's PoolingLayer::Forward_cpu written as plain loops (pooling_layer.cpp)."""
    n, c, h, w = x.shape
    rnd = math.ceil if ceil else math.floor
    oh = int(rnd((h + 2 * p - k) / s)) + 1
    ow = int(rnd((w + 2 * p - k) / s)) + 1
    if p:
        oh -= (oh - 1) * s >= h + p
        ow -= (ow - 1) * s >= w + p
    out = np.zeros((n, c, oh, ow), np.float64)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s - p, j * s - p
            he, we = min(hs + k, h + p), min(ws + k, w + p)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            win = x[:, :, hs:he, ws:we]
            if win.size == 0:  # a window wholly past the input keeps Caffe's initial value
                out[:, :, i, j] = -np.finfo(np.float32).max if is_max else 0.0
                continue
            out[:, :, i, j] = win.max(axis=(2, 3)) if is_max else win.sum(axis=(2, 3)) / size
    return out


@pytest.mark.parametrize(
    "h,k,s,p,ceil",
    [
        (112, 3, 2, 0, True),  # ResNet pool1: Caffe rounds up, 112 -> 56
        (7, 7, 1, 0, True),  # ResNet pool5
        (13, 3, 2, 1, True),  # padded: the last window starting in the padding is dropped
        (6, 3, 2, 1, True),
        (5, 2, 3, 0, True),  # kernel < stride: torch's rule differs, explicit path
        (5, 1, 3, 0, True),  # ... and the last window lies wholly past the input (-FLT_MAX for MAX)
        (6, 3, 2, 2, True),  # pad > kernel / 2: torch refuses, explicit path
        (13, 3, 2, 1, False),  # round_mode FLOOR
    ],
)
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_pooling_matches_caffe_loops(h, k, s, p, ceil, pool):
    rm = "CEIL" if ceil else "FLOOR"
    lp = layer(
        f'name: "p" type: "Pooling" '
        f"pooling_param {{ pool: {pool} kernel_size: {k} stride: {s} pad: {p} round_mode: {rm} }}"
    )
    m = L.build_layer(lp, [(2, 3, h, h)])
    x = torch.randn(2, 3, h, h, dtype=torch.float64)
    want = caffe_pool_ref(x.numpy(), k, s, p, pool == "MAX", ceil)
    assert m.top_shapes() == [want.shape]
    np.testing.assert_allclose(m(x).numpy(), want, rtol=1e-12, atol=1e-12)


def test_global_pooling():
    m = L.build_layer(
        layer('name: "g" type: "Pooling" pooling_param { pool: AVE global_pooling: true }'), [(2, 4, 5, 3)]
    )
    x = torch.randn(2, 4, 5, 3)
    assert m.top_shapes() == [(2, 4, 1, 1)]
    torch.testing.assert_close(m(x), x.mean((2, 3), keepdim=True))


def test_convolution_shapes_and_values():
    lp = layer(
        'name: "c" type: "Convolution" convolution_param { num_output: 4 kernel_h: 3 kernel_w: 1 stride: 2 '
        "pad_h: 1 pad_w: 0 group: 2 dilation: 2 }"
    )
    m = L.build_layer(lp, [(1, 6, 9, 8)])
    # caffe: (9 + 2 - (2*(3-1)+1)) // 2 + 1 = 4 ; (8 + 0 - 1) // 2 + 1 = 4
    assert m.top_shapes() == [(1, 4, 4, 4)]
    assert tuple(m.weight.shape) == (4, 3, 3, 1)
    assert torch.all(m.weight == 0) and torch.all(m.bias == 0)  # Caffe's default filler: constant 0
    assert m.macs() == 4 * 4 * 4 * 3 * 3 * 1


def test_msra_and_xavier_fillers_scale_with_fan_in():
    torch.manual_seed(0)
    lp = layer(
        'name: "c" type: "Convolution" '
        'convolution_param { num_output: 256 kernel_size: 3 weight_filler { type: "msra" } }'
    )
    m = L.build_layer(lp, [(1, 64, 8, 8)])
    assert m.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.02)
    lp = layer(
        'name: "f" type: "InnerProduct" inner_product_param { num_output: 300 weight_filler { type: "xavier" } }'
    )
    m = L.build_layer(lp, [(1, 200)])
    assert m.weight.abs().max().item() <= math.sqrt(3 / 200)
    assert m.weight.abs().max().item() > 0.95 * math.sqrt(3 / 200)


def test_batchnorm_global_stats_divides_by_scale_factor():
    m = L.build_layer(
        layer('name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.001 }'), [(2, 2, 1, 1)]
    )
    m.mean.copy_(torch.tensor([4.0, -2.0]))  # sums; scale factor 2 -> mean (2, -1)
    m.variance.copy_(torch.tensor([8.0, 0.5]))  # -> var (4, 0.25)
    m.scale_factor.fill_(2.0)
    x = torch.tensor([[[[3.0]], [[0.0]]], [[[1.0]], [[-1.0]]]])
    want = torch.tensor([[[[1 / math.sqrt(4.001)]], [[1 / math.sqrt(0.251)]]], [[[-1 / math.sqrt(4.001)]], [[0.0]]]])
    torch.testing.assert_close(m(x), want)


def test_batchnorm_zero_scale_factor_uses_zero_statistics():
    m = L.build_layer(layer('name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: true }'), [(1, 1, 1, 2)])
    x = torch.tensor([[[[1.0, -2.0]]]])
    torch.testing.assert_close(m(x), x / math.sqrt(1e-5))


def test_batchnorm_training_updates_caffe_sums():
    m = L.build_layer(
        layer('name: "bn" type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.5 }'), [(2, 1, 1, 2)]
    )
    m.train()
    x = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 6.0]]]])  # mean 3, biased var 3.5, unbiased 14/3
    y = m(x)
    torch.testing.assert_close(y, (x - 3.0) / math.sqrt(3.5 + 1e-5))
    torch.testing.assert_close(m.mean, torch.tensor([3.0]))
    torch.testing.assert_close(m.variance, torch.tensor([14 / 3]))
    torch.testing.assert_close(m.scale_factor, torch.tensor([1.0]))
    m(x)  # sums: 3 + 0.5 * 3, factor 1 + 0.5 * 1
    torch.testing.assert_close(m.mean, torch.tensor([4.5]))
    torch.testing.assert_close(m.scale_factor, torch.tensor([1.5]))
    torch.testing.assert_close(m.variance, torch.tensor([7.0]))


def test_scale_axis_num_axes_and_second_bottom():
    m = L.build_layer(
        layer('name: "s" type: "Scale" scale_param { axis: 1 num_axes: 2 bias_term: true }'), [(2, 3, 4, 5)]
    )
    assert tuple(m.weight.shape) == (3, 4) and torch.all(m.weight == 1) and torch.all(m.bias == 0)
    with torch.no_grad():
        m.weight.copy_(torch.arange(12.0).reshape(3, 4))
        m.bias.fill_(0.5)
    x = torch.ones(2, 3, 4, 5)
    torch.testing.assert_close(m(x)[1, 2, 3], torch.full((5,), 11.5))
    m2 = L.build_layer(layer('name: "s2" type: "Scale" scale_param { axis: 0 }'), [(2, 3), (2, 3)])
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(m2(a, b), a * b)


def test_eltwise_operations():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 5.0])
    s = L.build_layer(layer('name: "e" type: "Eltwise" eltwise_param { coeff: 1 coeff: -0.5 }'), [(2,), (2,)])
    torch.testing.assert_close(s(a, b), torch.tensor([-0.5, -4.5]))
    p = L.build_layer(layer('name: "e" type: "Eltwise" eltwise_param { operation: PROD }'), [(2,), (2,)])
    torch.testing.assert_close(p(a, b), torch.tensor([3.0, -10.0]))
    mx = L.build_layer(layer('name: "e" type: "Eltwise" eltwise_param { operation: MAX }'), [(2,), (2,)])
    torch.testing.assert_close(mx(a, b), b)


def test_accuracy_counts_ties_against_and_top_k():
    acc1 = L.build_layer(layer('name: "a" type: "Accuracy"'), [(3, 3), (3,)])
    acc2 = L.build_layer(layer('name: "a" type: "Accuracy" accuracy_param { top_k: 2 }'), [(3, 3), (3,)])
    x = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
    y = torch.tensor([0.0, 2.0, 0.0])  # tie -> wrong at top-1; right; second -> right at top-2
    assert acc1(x, y).item() == pytest.approx(1 / 3)
    assert acc2(x, y).item() == pytest.approx(1.0)


def test_softmax_with_loss_normalizations():
    x = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 3.0]])
    y = torch.tensor([0, 1, 1])
    nll = -torch.log_softmax(x, 1)[torch.arange(3), y]
    valid = L.build_layer(layer('name: "l" type: "SoftmaxWithLoss" loss_param { ignore_label: 1 }'), [(3, 2), (3,)])
    assert valid(x, y).item() == pytest.approx(nll[0].item())
    batch = L.build_layer(
        layer('name: "l" type: "SoftmaxWithLoss" loss_param { ignore_label: 1 normalize: false }'), [(3, 2), (3,)]
    )
    assert batch(x, y).item() == pytest.approx(nll[0].item() / 3)
    plain = L.build_layer(layer('name: "l" type: "SoftmaxWithLoss"'), [(3, 2), (3,)])
    assert plain(x, y.float()).item() == pytest.approx(nll.mean().item())


def test_lrn_matches_caffe_formula():
    x = torch.randn(1, 5, 3, 3, dtype=torch.float64)
    m = L.build_layer(
        layer('name: "n" type: "LRN" lrn_param { local_size: 3 alpha: 0.3 beta: 0.75 k: 2 }'), [(1, 5, 3, 3)]
    )
    sq = torch.nn.functional.pad(x * x, (0, 0, 0, 0, 1, 1))
    win = sq[:, 0:5] + sq[:, 1:6] + sq[:, 2:7]
    torch.testing.assert_close(m(x), x * (2 + 0.3 / 3 * win) ** -0.75)
    w = L.build_layer(
        layer('name: "n" type: "LRN" lrn_param { local_size: 3 alpha: 0.3 norm_region: WITHIN_CHANNEL }'),
        [(1, 5, 3, 3)],
    )
    padded = torch.nn.functional.pad(x * x, (1, 1, 1, 1))
    avg = sum(padded[:, :, i : i + 3, j : j + 3] for i in range(3) for j in range(3)) / 9
    torch.testing.assert_close(w(x), x * (1 + 0.3 * avg) ** -0.75)


def test_inner_product_axis_and_transpose():
    m = L.build_layer(
        layer('name: "f" type: "InnerProduct" inner_product_param { num_output: 2 transpose: true }'), [(4, 3, 2)]
    )
    assert tuple(m.weight.shape) == (6, 2) and m.top_shapes() == [(4, 2)]
    with torch.no_grad():
        m.weight.copy_(torch.arange(12.0).reshape(6, 2))
    x = torch.ones(4, 3, 2)
    torch.testing.assert_close(m(x)[0], torch.tensor([30.0, 36.0]))


def test_flatten_concat_split_filter():
    f = L.build_layer(layer('name: "f" type: "Flatten" flatten_param { axis: 1 end_axis: 2 }'), [(2, 3, 4, 5)])
    assert f.top_shapes() == [(2, 12, 5)]
    c = L.build_layer(layer('name: "c" type: "Concat"'), [(2, 3, 4), (2, 1, 4)])
    assert c.top_shapes() == [(2, 4, 4)]
    sp = L.build_layer(layer('name: "s" type: "Split" top: "a" top: "b"'), [(2, 3)])
    assert len(sp(torch.zeros(2, 3))) == 2
    filt = L.build_layer(layer('name: "f" type: "Filter" filter_param { num_output: 2 }'), [(1, 4, 1, 1)])
    filt.selector.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    x = torch.arange(4.0).reshape(1, 4, 1, 1)
    torch.testing.assert_close(filt(x).flatten(), torch.tensor([1.0, 3.0]))


def test_registry_errors():
    with pytest.raises(PrototxtError, match=r"Unknown layer type: Bogus \(known types: .*Convolution.*\)"):
        L.build_layer(layer('name: "x" type: "Bogus"'), [(1,)])
    with pytest.raises(PrototxtError, match="layer 'py'.*Python layer.*refused"):
        L.build_layer(layer('name: "py" type: "Python" python_param { module: "os" layer: "system" }'), [(1,)])
    with pytest.raises(KeyError, match="registered twice"):
        L.register("ReLU")(type("Again", (L.CaffeLayer,), {}))
    with pytest.raises(PrototxtError, match="layer 'c'.*num_output"):
        L.build_layer(
            layer('name: "c" type: "Convolution" convolution_param { num_output: 3 kernel_size: 1 group: 2 }'),
            [(1, 4, 2, 2)],
        )


def test_relu_negative_slope_and_inplace_does_not_touch_inputs():
    net = net_from(
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 } } }'
        'layer { name: "r" type: "ReLU" bottom: "x" top: "x" relu_param { negative_slope: 0.1 } }'
    )
    x = torch.tensor([[-1.0, 0.0, 2.0]])
    out = net(x)
    torch.testing.assert_close(out["x"], torch.tensor([[-0.1, 0.0, 2.0]]))
    assert x[0, 0].item() == -1.0  # the caller's tensor is not overwritten


def test_pooling_clip_rule_applies_to_both_axes_when_either_is_padded():
    # (kernel_h 2, not 1: Caffe requires pad < kernel -- pooling_layer.cpp CHECK_LT(pad_h_, kernel_h_))
    lp = layer('name: "p" type: "Pooling" pooling_param { kernel_h: 2 kernel_w: 1 stride: 3 pad_h: 1 pad_w: 0 }')
    # caffe: w = ceil((5 - 1) / 3) + 1 = 3, then (3 - 1) * 3 >= 5 + 0 drops one because pad_h is set
    assert L.build_layer(lp, [(1, 1, 5, 5)]).top_shapes() == [(1, 1, 2, 2)]


def test_half_pairs_are_refused_as_caffe_does():
    with pytest.raises(PrototxtError, match="pad_h and pad_w"):
        L.build_layer(layer('name: "p" type: "Pooling" pooling_param { kernel_size: 2 pad_w: 1 }'), [(1, 1, 4, 4)])
    with pytest.raises(PrototxtError, match="must be positive"):
        L.build_layer(
            layer('name: "c" type: "Convolution" convolution_param { num_output: 1 kernel_w: 3 }'), [(1, 1, 4, 4)]
        )


def test_softmax_loss_caps_each_sample_like_caffe_but_keeps_its_gradient():
    m = L.build_layer(layer('name: "l" type: "SoftmaxWithLoss"'), [(1, 2), (1,)])
    x = torch.tensor([[0.0, 200.0]], requires_grad=True)
    loss = m(x, torch.tensor([0]))
    assert loss.item() == pytest.approx(-math.log(np.finfo(np.float32).tiny))  # 87.3365, not 200
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[-1.0, 1.0]]))  # caffe: prob - 1 for the label


def test_scalar_scale_blob_round_trips(tmp_path):
    text = (
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }'
        'layer { name: "s" type: "Scale" bottom: "x" top: "y" scale_param { num_axes: 0 bias_term: true } }'
        'layer { name: "bn" type: "BatchNorm" bottom: "y" top: "z" }'
        'layer { name: "s2" type: "Scale" bottom: "z" top: "z" scale_param { axis: 0 num_axes: -1 } }'
    )
    a = net_from(text)
    with torch.no_grad():
        a.layers["s"].weight.fill_(3.0)
    a.save_caffemodel(tmp_path / "m.caffemodel")
    b = net_from(text)
    b.load_caffemodel(tmp_path / "m.caffemodel")
    assert b.layers["s"].weight.shape == () and b.layers["s"].weight.item() == 3.0
    assert "bn" not in b._fused_scale  # s2 scales every element, not per channel: not fused into bn
    torch.testing.assert_close(b(torch.ones(2, 3))["z"], a(torch.ones(2, 3))["z"])
