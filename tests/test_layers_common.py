"""Common layers (net/layers/common.py, shape.py, reduce.py) against Caffe's formulas written in numpy, and
their gradients by finite differences; each formula's Caffe source is named at its case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text
from tests._layer_cases import Case, build, check_grad, check_value

RNG = np.random.default_rng(1)
X4 = RNG.standard_normal((2, 3, 4, 5))
X3 = RNG.standard_normal((2, 3, 4))
A, B, C = (RNG.standard_normal((2, 3)) for _ in range(3))


def f32(v: float) -> float:
    return float(np.float32(v))


def _fill(name: str, values):
    def setup(m):
        getattr(m, name).copy_(torch.as_tensor(np.asarray(values, dtype=np.float64)))

    return setup


def _both(*setups):
    def setup(m):
        for s in setups:
            s(m)

    return setup


W_IP = np.arange(24.0).reshape(2, 12) / 10 - 1
IP = 'type: "InnerProduct" inner_product_param { num_output: 2 }'
IP_T = 'type: "InnerProduct" inner_product_param { num_output: 2 axis: 2 transpose: true bias_term: false }'
BN_STATS = _both(_fill("mean", [2.0, -4.0, 1.0]), _fill("variance", [8.0, 2.0, 0.5]), _fill("scale_factor", [2.0]))


def _bn_global(x):  # caffe: batch_norm_layer.cpp -- stored sums divided by the scale factor
    mean, var = np.array([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1), np.array([4.0, 1.0, 0.25]).reshape(1, 3, 1, 1)
    return (x - mean) / np.sqrt(var + f32(1e-5))


def _bn_batch(x):  # caffe: TRAIN normalizes with the batch mean and (biased) variance
    mean, var = x.mean((0, 2, 3), keepdims=True), x.var((0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + f32(1e-5))


def _softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


EPS_MVN = f32(1e-9)


def _mvn(x, across, norm, eps=EPS_MVN):
    dims = tuple(range(1 if across else 2, x.ndim))
    c = x - x.mean(dims, keepdims=True)
    return c / (np.sqrt((c**2).mean(dims, keepdims=True)) + eps) if norm else c


def _argmax_ref(x, k, out_max_val, axis=None):
    """caffe: argmax_layer.cpp Forward_cpu -- partial_sort by (value, index) descending."""
    v = np.moveaxis(x, axis, -1) if axis is not None else x.reshape(x.shape[0], -1)
    flat = v.reshape(-1, v.shape[-1])
    order = np.array([sorted(range(len(r)), key=lambda j: (r[j], j), reverse=True)[:k] for r in flat])
    idx = order.reshape(v.shape[:-1] + (k,)).astype(float)
    val = np.take_along_axis(v, order.reshape(v.shape[:-1] + (k,)), -1)
    if axis is not None:
        return np.moveaxis(val if out_max_val else idx, -1, axis)
    out = np.stack([idx, val], 1) if out_max_val else idx[:, None]
    return out.reshape(out.shape + (1,) * (x.ndim - 3))


TIES = np.array([[[1.0, 3.0, 3.0, 0.0]], [[2.0, 2.0, 5.0, 2.0]]])  # ties rank the larger index first
IDX = np.array([[3.0, 0.0], [1.0, 3.0], [2.0, 2.0]])
W_EMB = np.arange(12.0).reshape(4, 3) - 5
SEL = np.array([0.0, 2.0])
PERM = np.array([1.0, 0.0, 1.0])

VALUE_CASES: dict[str, list[Case]] = {
    # caffe: inner_product_layer.cpp -- y = x W^T + b over the axes from `axis` on
    "InnerProduct": [
        Case(
            IP,
            [X3],
            lambda x: x.reshape(2, 12) @ W_IP.T + [0.5, -1],
            _both(_fill("weight", W_IP), _fill("bias", [0.5, -1])),
        ),
        Case(IP_T, [X3], lambda x: x @ W_IP[:, :4].T, _fill("weight", W_IP[:, :4].T)),
    ],
    "BatchNorm": [
        Case('type: "BatchNorm"', [X4], _bn_global, BN_STATS),
        Case('type: "BatchNorm"', [X4], _bn_batch, train=True),
        Case('type: "BatchNorm" batch_norm_param { use_global_stats: false }', [X4], _bn_batch, BN_STATS),
    ],
    # caffe: scale_layer.cpp -- y = x * s (+ b), s broadcast from `axis`
    "Scale": [
        Case(
            'type: "Scale" scale_param { bias_term: true }',
            [X4],
            lambda x: x * [[[[2]], [[-1]], [[0.5]]]] + [[[[1]], [[0]], [[-2]]]],
            _both(_fill("weight", [2, -1, 0.5]), _fill("bias", [1, 0, -2])),
        ),
        Case('type: "Scale" scale_param { axis: 0 }', [A, B], lambda a, b: a * b),
        Case(
            'type: "Scale" scale_param { axis: -1 num_axes: 1 }',
            [X3],
            lambda x: x * [1, 2, 3, 4],
            _fill("weight", [1, 2, 3, 4]),
        ),
    ],
    # caffe: bias_layer.cpp -- y = x + b
    "Bias": [
        Case('type: "Bias"', [X4], lambda x: x + np.array([1, -2, 3]).reshape(1, 3, 1, 1), _fill("bias", [1, -2, 3])),
        Case(
            'type: "Bias" bias_param { axis: 1 num_axes: 2 }',
            [X3],
            lambda x: x + np.arange(12.0).reshape(3, 4),
            _fill("bias", np.arange(12.0).reshape(3, 4)),
        ),
        Case('type: "Bias" bias_param { axis: 0 }', [A, B], lambda a, b: a + b),
        Case('type: "Bias" bias_param { num_axes: 0 filler { type: "constant" value: 1.5 } }', [A], lambda a: a + 1.5),
    ],
    # caffe: eltwise_layer.cpp
    "Eltwise": [
        Case('type: "Eltwise"', [A, B, C], lambda a, b, c: a + b + c),
        Case(
            'type: "Eltwise" eltwise_param { coeff: 1 coeff: -0.5 coeff: 2 }',
            [A, B, C],
            lambda a, b, c: a - 0.5 * b + 2 * c,
        ),
        Case('type: "Eltwise" eltwise_param { operation: PROD }', [A, B, C], lambda a, b, c: a * b * c),
        Case('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', [A, B], lambda a, b: a * b),
        Case(
            'type: "Eltwise" eltwise_param { operation: MAX }',
            [A, B, C],
            lambda a, b, c: np.maximum(np.maximum(a, b), c),
        ),
    ],
    "Softmax": [
        Case('type: "Softmax"', [X4], lambda x: _softmax(x, 1)),
        Case('type: "Softmax" softmax_param { axis: -1 }', [X3], lambda x: _softmax(x, 2)),
    ],
    # caffe: embed_layer.cpp -- top = W[index] + b
    "Embed": [
        Case(
            'type: "Embed" embed_param { num_output: 3 input_dim: 4 }',
            [IDX],
            lambda i: W_EMB[i.astype(int)] + [1, 2, 3],
            _both(_fill("weight", W_EMB), _fill("bias", [1, 2, 3])),
        ),
        Case(
            'type: "Embed" embed_param { num_output: 3 input_dim: 4 bias_term: false '
            'weight_filler { type: "constant" value: 2 } }',
            [IDX],
            lambda i: np.full((3, 2, 3), 2.0),
        ),
    ],
    "Parameter": [
        Case('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [], lambda: np.zeros((2, 3))),
        Case('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [], lambda: A, _fill("weight", A)),
    ],
    "MVN": [
        Case('type: "MVN"', [X4], lambda x: _mvn(x, False, True)),
        Case('type: "MVN" mvn_param { across_channels: true }', [X4], lambda x: _mvn(x, True, True)),
        Case('type: "MVN" mvn_param { normalize_variance: false }', [X4], lambda x: _mvn(x, False, False)),
        Case('type: "MVN" mvn_param { eps: 0.5 }', [X4], lambda x: _mvn(x, False, True, 0.5)),
    ],
    # caffe: reduction_layer.cpp -- over all axes from `axis`, times coeff
    "Reduction": [
        Case('type: "Reduction"', [X3], lambda x: np.array(x.sum())),
        Case('type: "Reduction" reduction_param { operation: ASUM axis: 1 }', [X3], lambda x: np.abs(x).sum((1, 2))),
        Case(
            'type: "Reduction" reduction_param { operation: SUMSQ axis: -1 coeff: 0.5 }',
            [X3],
            lambda x: 0.5 * (x**2).sum(2),
        ),
        Case(
            'type: "Reduction" reduction_param { operation: MEAN axis: 1 coeff: -2 }',
            [X4],
            lambda x: -2 * x.mean((1, 2, 3)),
        ),
    ],
    "ArgMax": [
        Case('type: "ArgMax"', [X3], lambda x: _argmax_ref(x, 1, False)),
        Case('type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', [X4], lambda x: _argmax_ref(x, 3, True)),
        Case('type: "ArgMax" argmax_param { top_k: 2 axis: 1 }', [X4], lambda x: _argmax_ref(x, 2, False, 1)),
        Case(
            'type: "ArgMax" argmax_param { axis: -1 out_max_val: true top_k: 2 }',
            [X3],
            lambda x: _argmax_ref(x, 2, True, 2),
        ),
        Case('type: "ArgMax" argmax_param { top_k: 2 }', [TIES], lambda x: np.array([[[2.0, 1.0]], [[2.0, 3.0]]])),
    ],
    # caffe: concat_layer.cpp / slice_layer.cpp / split_layer.cpp / flatten_layer.cpp / reshape_layer.cpp
    "Concat": [
        Case('type: "Concat"', [A, B], lambda a, b: np.concatenate([a, b], 1)),
        Case('type: "Concat" concat_param { concat_dim: 0 }', [A, B, C], lambda a, b, c: np.concatenate([a, b, c], 0)),
    ],
    "Slice": [
        Case('type: "Slice" top: "a" top: "b" top: "c"', [X4], lambda x: np.split(x, 3, 1)),
        Case(
            'type: "Slice" top: "a" top: "b" slice_param { axis: -1 slice_point: 1 }',
            [X4],
            lambda x: np.split(x, [1], 3),
        ),
        Case(
            'type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_dim: 2 slice_point: 1 slice_point: 3 }',
            [X4],
            lambda x: np.split(x, [1, 3], 2),
        ),
        Case('type: "Slice" top: "a"', [A], lambda a: a),
    ],
    "Split": [Case('type: "Split" top: "a" top: "b"', [A], lambda a: [a, a])],
    "Flatten": [
        Case('type: "Flatten"', [X4], lambda x: x.reshape(2, 60)),
        Case('type: "Flatten" flatten_param { axis: 1 end_axis: -2 }', [X4], lambda x: x.reshape(2, 12, 5)),
    ],
    "Reshape": [
        Case('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 5 } }', [X4], lambda x: x.reshape(2, 12, 5)),
        Case(
            'type: "Reshape" reshape_param { shape { dim: 2 dim: 2 } axis: 2 num_axes: 1 }',
            [X4],
            lambda x: x.reshape(2, 3, 2, 2, 5),
        ),
        Case(
            'type: "Reshape" reshape_param { shape { dim: 1 } axis: -1 num_axes: 0 }',
            [X3],
            lambda x: x.reshape(2, 3, 4, 1),
        ),
        Case('type: "Reshape" reshape_param { shape { dim: -1 } axis: 1 }', [X4], lambda x: x.reshape(2, 60)),
    ],
    # caffe: tile_layer.cpp -- the block from `axis` on, `tiles` times
    "Tile": [
        Case('type: "Tile" tile_param { tiles: 3 }', [X3], lambda x: np.concatenate([x] * 3, 1)),
        Case('type: "Tile" tile_param { axis: -1 tiles: 2 }', [X3], lambda x: np.concatenate([x] * 2, 2)),
    ],
    # caffe: crop_layer.cpp
    "Crop": [
        Case('type: "Crop"', [X4, np.zeros((1, 1, 2, 3))], lambda x, _: x[:, :, :2, :3]),
        Case('type: "Crop" crop_param { offset: 1 }', [X4, np.zeros((1, 1, 2, 3))], lambda x, _: x[:, :, 1:3, 1:4]),
        Case(
            'type: "Crop" crop_param { axis: 1 offset: 1 offset: 2 offset: 0 }',
            [X4, np.zeros((1, 2, 2, 3))],
            lambda x, _: x[:, 1:3, 2:4, 0:3],
        ),
    ],
    # caffe: batch_reindex_layer.cpp -- top[i] = bottom[permut[i]]
    "BatchReindex": [Case('type: "BatchReindex"', [X3, PERM], lambda x, p: x[p.astype(int)])],
    "Filter": [
        # BVLC (filter_layer.cpp): the items whose selector is non-zero, one top per filtered bottom
        Case('type: "Filter" top: "a"', [X3, SEL], lambda x, s: x[s != 0], batch_dynamic=True),
        Case(
            'type: "Filter" top: "a" top: "b"',
            [X3, A, SEL.reshape(2, 1)],
            lambda x, a, s: [x[1:], a[1:]],
            batch_dynamic=True,
        ),
        # caffe-pro (one bottom): the channels whose selector blob entry is non-zero
        Case(
            'type: "Filter" filter_param { num_output: 2 }', [X4], lambda x: x[:, [0, 2]], _fill("selector", [1, 0, 1])
        ),
    ],
    "Silence": [Case('type: "Silence"', [A, B], lambda a, b: [])],
}

GRAD_CASES: dict[str, list[Case]] = {
    "InnerProduct": [Case(IP, [X3]), Case(IP_T, [X3])],
    "BatchNorm": [Case('type: "BatchNorm"', [X4], setup=BN_STATS), Case('type: "BatchNorm"', [X4], train=True)],
    "Scale": [
        Case('type: "Scale" scale_param { bias_term: true }', [X4]),
        Case('type: "Scale" scale_param { axis: 0 }', [A, B]),
    ],
    "Bias": [Case('type: "Bias"', [X4]), Case('type: "Bias" bias_param { axis: 0 }', [A, B])],
    "Eltwise": [
        Case('type: "Eltwise" eltwise_param { coeff: 1 coeff: -0.5 coeff: 2 }', [A, B, C]),
        Case('type: "Eltwise" eltwise_param { operation: PROD }', [A, B, C]),
        Case('type: "Eltwise" eltwise_param { operation: MAX }', [A, B, C]),
    ],
    "Softmax": [Case('type: "Softmax"', [X4]), Case('type: "Softmax" softmax_param { axis: 0 }', [A])],
    # caffe: Embed refuses a gradient for its indices; the weight and bias get one
    "Embed": [Case('type: "Embed" embed_param { num_output: 3 input_dim: 4 }', [IDX], grad=())],
    "Parameter": [Case('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [])],
    "MVN": [
        Case('type: "MVN"', [X4]),
        Case('type: "MVN" mvn_param { across_channels: true }', [X4]),
        Case('type: "MVN" mvn_param { normalize_variance: false }', [X4]),
    ],
    "Reduction": [
        Case('type: "Reduction" reduction_param { operation: ASUM axis: 1 }', [X3]),
        Case('type: "Reduction" reduction_param { operation: SUMSQ axis: -1 coeff: 0.5 }', [X3]),
        Case('type: "Reduction" reduction_param { operation: MEAN axis: 1 coeff: -2 }', [X4]),
    ],
    # caffe: argmax_layer.hpp -- Backward_cpu NOT_IMPLEMENTED: no gradient leaves the layer
    "ArgMax": [Case('type: "ArgMax" argmax_param { axis: 1 out_max_val: true }', [X4], no_grad=True)],
    "Concat": [Case('type: "Concat"', [A, B])],
    "Slice": [Case('type: "Slice" top: "a" top: "b" slice_param { axis: -1 slice_point: 1 }', [X4])],
    "Split": [Case('type: "Split" top: "a" top: "b"', [A])],
    "Flatten": [Case('type: "Flatten"', [X4])],
    "Reshape": [Case('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 5 } }', [X4])],
    "Tile": [Case('type: "Tile" tile_param { tiles: 3 }', [X3])],
    "Crop": [Case('type: "Crop" crop_param { offset: 1 }', [X4, np.zeros((1, 1, 2, 3))], grad=[0])],
    "BatchReindex": [Case('type: "BatchReindex"', [X3, PERM], grad=[0])],  # item 1 picked twice: gradient 2
    "Filter": [
        Case('type: "Filter" top: "a" top: "b"', [X3, A, SEL], grad=[0, 1]),
        Case('type: "Filter" filter_param { num_output: 2 }', [X4], setup=_fill("selector", [1, 0, 1])),
    ],
    # caffe: silence_layer.cpp -- Backward sets the bottoms' gradient to zero
    "Silence": [Case('type: "Silence"', [A, B], no_grad=True)],
}


@pytest.mark.parametrize("case", [pytest.param(c, id=t) for t, cs in VALUE_CASES.items() for c in cs])
def test_value(case):
    check_value(case)


@pytest.mark.parametrize("case", [pytest.param(c, id=t) for t, cs in GRAD_CASES.items() for c in cs])
def test_grad(case):
    check_grad(case)


def _net(text: str) -> CaffeNet:
    return CaffeNet(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)


def test_parameter_and_silence_in_a_net_and_their_blobs_round_trip(tmp_path):
    text = (
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }'
        'layer { name: "p" type: "Parameter" top: "w" parameter_param { shape { dim: 2 dim: 3 } } }'
        'layer { name: "prod" type: "Eltwise" bottom: "x" bottom: "w" top: "y" eltwise_param { operation: PROD } }'
        'layer { name: "r" type: "Reduction" bottom: "y" top: "loss" loss_weight: 1 }'
        'layer { name: "x2" type: "Power" bottom: "x" top: "x2" }'
        'layer { name: "s" type: "Silence" bottom: "x2" }'
    )
    a = _net(text)
    with torch.no_grad():
        a.layers["p"].weight.copy_(torch.arange(6.0).reshape(2, 3))
    x = torch.ones(2, 3, requires_grad=True)
    out = a(x)
    assert set(out) == {"loss"} and out["loss"].item() == 15.0
    a.loss(out).backward()
    torch.testing.assert_close(a.layers["p"].weight.grad, torch.ones(2, 3))  # d(sum x * w)/dw = x
    torch.testing.assert_close(x.grad, torch.arange(6.0).reshape(2, 3))  # the silenced branch adds nothing
    a.save_caffemodel(tmp_path / "m.caffemodel")
    b = _net(text)
    b.load_caffemodel(tmp_path / "m.caffemodel")
    torch.testing.assert_close(b.layers["p"].weight, a.layers["p"].weight)


@pytest.mark.parametrize(
    "text,shapes,match",
    [
        ('type: "Slice" top: "a" top: "b" slice_param { slice_point: 1 slice_point: 2 }', [(2, 3)], "2 slice points"),
        ('type: "Slice" top: "a" top: "b"', [(2, 3)], "does not split into 2 equal parts"),
        ('type: "Slice" top: "a" top: "b" slice_param { axis: 1 slice_dim: 1 }', [(2, 4)], "either axis or slice_dim"),
        ('type: "Reshape" reshape_param { shape { dim: -1 dim: 7 } }', [(2, 3)], "cannot infer"),
        ('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [(2, 3)], "at most one"),
        ('type: "Reshape" reshape_param { shape { dim: 5 } }', [(2, 3)], "different count"),
        ('type: "Crop" crop_param { offset: 2 }', [(1, 1, 4, 4), (1, 1, 3, 3)], "cannot crop 3 at offset 2"),
        ('type: "Crop" crop_param { offset: 1 offset: 1 offset: 1 }', [(1, 1, 4, 4), (1, 1, 3, 3)], "3 offsets"),
        ('type: "Tile" tile_param { tiles: 0 }', [(2, 3)], "tiles must be positive"),
        ('type: "ArgMax" argmax_param { top_k: 7 }', [(2, 3)], "top_k 7"),
        ('type: "Bias" bias_param { axis: 1 }', [(2, 3), (4,)], "does not match"),
        ('type: "Filter" top: "a"', [(2, 3), (3,)], "selector's first dimension"),
        ('type: "Filter" top: "a"', [(2, 3), (2, 2)], "singletons"),
        ('type: "Embed" embed_param { num_output: 3 }', [(2,)], "input_dim"),
        ('type: "Flatten" flatten_param { axis: 4 }', [(2, 3)], "axis 4 is out of range"),
    ],
)
def test_bad_parameters_are_one_line_errors_naming_the_layer(text, shapes, match):
    from resnet_imagenet.net import layers as L
    from resnet_imagenet.proto.text import PrototxtError

    with pytest.raises(PrototxtError, match=f"layer 'bad' .*{match}"):
        L.build_layer(parse_text('name: "bad" ' + text, caffe_pb2.LayerParameter()), shapes)


def test_embed_refuses_out_of_range_indices():
    m = build(Case('name: "e" type: "Embed" embed_param { num_output: 2 input_dim: 3 }', [IDX]))
    with pytest.raises(ValueError, match="layer 'e': Embed inputs must be integers in 0..2"):
        m(torch.tensor([0.0, 3.0]))


def test_two_filter_kinds_are_told_apart_by_bottoms():
    from resnet_imagenet.net import layers as L

    one = build(Case('type: "Filter" filter_param { num_output: 1 }', [X4]))
    two = build(Case('type: "Filter" top: "a"', [X3, SEL]))
    assert type(one) is L.Filter and type(two) is L.BatchFilter
    assert two.blobs() == [] and [tuple(b.shape) for b in one.blobs()] == [(3,)]
