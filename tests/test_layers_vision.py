"""Vision layers against Caffe's formulas as direct numpy loops (conv_layer.cpp / im2col.cpp, deconv_layer.cpp,
pooling_layer.cpp, spp_layer.cpp, lrn_layer.cpp), and their gradients by finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnet_imagenet.net import layers as L
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError, parse_text
from tests._layer_cases import Case, check_grad, check_value
from tests.test_layers import caffe_pool_ref

RNG = np.random.default_rng(2)
X = RNG.standard_normal((2, 4, 5, 6))
W_CONV = RNG.standard_normal((6, 2, 3, 2))  # num_output 6, group 2: 4 / 2 input channels per group
W_DECONV = RNG.standard_normal((4, 3, 2, 3))  # num_input 4, num_output 6 / group 2
BIAS6 = np.arange(6.0) / 4


def f32(v: float) -> float:
    return float(np.float32(v))


def _set(**blobs):
    def setup(m):
        for k, v in blobs.items():
            getattr(m, k).copy_(torch.from_numpy(v))

    return setup


def _windows(x, k, s, p, d):
    """im2col: for each output (i, j) and kernel tap (a, b), the input at (i*s - p + a*d, j*s - p + b*d) or 0."""
    n, c, h, w = x.shape
    oh = (h + 2 * p[0] - (d[0] * (k[0] - 1) + 1)) // s[0] + 1
    ow = (w + 2 * p[1] - (d[1] * (k[1] - 1) + 1)) // s[1] + 1
    cols = np.zeros((n, c, k[0], k[1], oh, ow))
    for i in range(oh):
        for j in range(ow):
            for a in range(k[0]):
                for b in range(k[1]):
                    y, z = i * s[0] - p[0] + a * d[0], j * s[1] - p[1] + b * d[1]
                    if 0 <= y < h and 0 <= z < w:
                        cols[:, :, a, b, i, j] = x[:, :, y, z]
    return cols


def conv_ref(x, w, b, k, s, p, d, group):
    cols = _windows(x, k, s, p, d)
    n, cin = x.shape[:2]
    cout = w.shape[0]
    out = np.zeros((n, cout) + cols.shape[4:])
    for o in range(cout):
        g = o // (cout // group)
        cs = slice(g * cin // group, (g + 1) * cin // group)
        out[:, o] = np.einsum("ncabij,cab->nij", cols[:, cs], w[o])
    return out + (0 if b is None else b.reshape(1, -1, 1, 1))


def deconv_ref(x, w, b, k, s, p, d, group):
    """caffe: deconv_layer.cpp -- every input value scatters x * W into the output (col2im of the GEMM)."""
    n, cin, h, wd = x.shape
    cog = w.shape[1]
    oh, ow = s[0] * (h - 1) + d[0] * (k[0] - 1) + 1 - 2 * p[0], s[1] * (wd - 1) + d[1] * (k[1] - 1) + 1 - 2 * p[1]
    out = np.zeros((n, cog * group, oh, ow))
    for c in range(cin):
        g = c // (cin // group)
        for i in range(h):
            for j in range(wd):
                for a in range(k[0]):
                    for bb in range(k[1]):
                        y, z = i * s[0] - p[0] + a * d[0], j * s[1] - p[1] + bb * d[1]
                        if 0 <= y < oh and 0 <= z < ow:
                            out[:, g * cog : (g + 1) * cog, y, z] += x[:, c, i, j, None] * w[c, :, a, bb]
    return out + (0 if b is None else b.reshape(1, -1, 1, 1))


CONV = (
    'type: "Convolution" convolution_param { num_output: 6 group: 2 kernel_h: 3 kernel_w: 2 stride: 2 stride: 1 '
    "pad_h: 1 dilation: 2 dilation: 1 }"
)
DECONV = (
    'type: "Deconvolution" convolution_param { num_output: 6 group: 2 kernel_h: 2 kernel_w: 3 stride: 2 '
    "pad: 1 dilation: 1 dilation: 2 }"
)
DECONV_PLAIN = 'type: "Deconvolution" convolution_param { num_output: 3 kernel_size: 2 stride: 2 bias_term: false }'
W_PLAIN = RNG.standard_normal((4, 3, 2, 2))


def _spp_ref(x, height, is_max):
    parts = []
    for level in range(height):
        bins = 2**level
        k = -(-x.shape[2] // bins) if height > 1 else x.shape[2]
        p = (k * bins - x.shape[2] + 1) // 2 if height > 1 else 0
        parts.append(caffe_pool_ref(x, k, k, p, is_max).reshape(x.shape[0], -1))
    return np.concatenate(parts, 1)


def _lrn_across(x, n, alpha, beta, k):  # caffe: scale = k + alpha / n * sum of x^2 over n channels
    sq = np.pad(x**2, ((0, 0), (n // 2, n // 2), (0, 0), (0, 0)))
    s = sum(sq[:, i : i + x.shape[1]] for i in range(n))
    return x * (k + alpha / n * s) ** -beta


def _lrn_within(x, n, alpha, beta):  # caffe: (1 + alpha * mean of x^2 over an n x n window, zero padded)^-beta
    sq = np.pad(x**2, ((0, 0), (0, 0), (n // 2, n // 2), (n // 2, n // 2)))
    h, w = x.shape[2:]
    s = sum(sq[:, :, i : i + h, j : j + w] for i in range(n) for j in range(n))
    return x * (1 + alpha * s / n**2) ** -beta


SQ = RNG.standard_normal((1, 2, 7, 7))
XS, SQS = X[:1, :, :3, :4], SQ[:, :, :4, :4]  # smaller inputs keep gradcheck fast

VALUE_CASES: dict[str, list[Case]] = {
    "Convolution": [
        Case(
            CONV,
            [X],
            lambda x: conv_ref(x, W_CONV, BIAS6, (3, 2), (2, 1), (1, 0), (2, 1), 2),
            _set(weight=W_CONV, bias=BIAS6),
        ),
        Case(
            'type: "Convolution" convolution_param { num_output: 6 kernel_size: 1 bias_term: false '
            'weight_filler { type: "constant" value: 0.5 } }',
            [X],
            lambda x: np.repeat(x.sum(1, keepdims=True) / 2, 6, 1),
        ),
    ],
    "Deconvolution": [
        Case(
            DECONV,
            [X],
            lambda x: deconv_ref(x, W_DECONV, BIAS6, (2, 3), (2, 2), (1, 1), (1, 2), 2),
            _set(weight=W_DECONV, bias=BIAS6),
        ),
        Case(
            DECONV_PLAIN,
            [X],
            lambda x: deconv_ref(x, W_PLAIN, None, (2, 2), (2, 2), (0, 0), (1, 1), 1),
            _set(weight=W_PLAIN),
        ),
    ],
    # caffe: im2col_layer.cpp -- rows in (channel, kernel row, kernel column) order
    "Im2col": [
        Case(
            'type: "Im2col" convolution_param { kernel_h: 2 kernel_w: 3 stride: 2 pad: 1 dilation: 2 }',
            [X],
            lambda x: _windows(x, (2, 3), (2, 2), (1, 1), (2, 2)).reshape(
                2, 24, *_windows(x, (2, 3), (2, 2), (1, 1), (2, 2)).shape[4:]
            ),
        ),
    ],
    "Pooling": [
        Case(
            'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }',
            [SQ],
            lambda x: caffe_pool_ref(x, 3, 2, 1, True),
        ),
        Case(
            'type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 }',
            [SQ],
            lambda x: caffe_pool_ref(x, 3, 2, 0, False),
        ),
        Case(
            'type: "Pooling" pooling_param { pool: AVE global_pooling: true }',
            [X],
            lambda x: x.mean((2, 3), keepdims=True),
        ),
        Case(
            'type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR }',
            [SQ],
            lambda x: caffe_pool_ref(x, 2, 2, 0, True, ceil=False),
        ),
    ],
    "SPP": [
        Case('type: "SPP" spp_param { pyramid_height: 3 }', [SQ], lambda x: _spp_ref(x, 3, True)),
        Case('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', [SQ], lambda x: _spp_ref(x, 2, False)),
        Case('type: "SPP" spp_param { pyramid_height: 1 }', [SQ], lambda x: x.max((2, 3)).reshape(1, 2)),
    ],
    "LRN": [
        Case(
            'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }',
            [X],
            lambda x: _lrn_across(x, 3, 0.5, 0.75, 2.0),
        ),
        Case(
            'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 norm_region: WITHIN_CHANNEL }',
            [X],
            lambda x: _lrn_within(x, 3, 0.5, 0.75),
        ),
    ],
}

GRAD_CASES: dict[str, list[Case]] = {
    "Convolution": [Case(CONV, [XS])],
    "Deconvolution": [Case(DECONV, [XS]), Case(DECONV_PLAIN, [XS])],
    "Im2col": [Case('type: "Im2col" convolution_param { kernel_size: 2 stride: 2 pad: 1 }', [XS])],
    "Pooling": [
        Case('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }', [SQS]),
        Case('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }', [SQS]),
    ],
    "SPP": [
        Case('type: "SPP" spp_param { pyramid_height: 3 }', [SQS]),
        Case('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', [SQS]),
    ],
    "LRN": [
        Case('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }', [XS]),
        Case('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 norm_region: WITHIN_CHANNEL }', [XS]),
    ],
}


@pytest.mark.parametrize("case", [pytest.param(c, id=t) for t, cs in VALUE_CASES.items() for c in cs])
def test_value(case):
    check_value(case)


@pytest.mark.parametrize("case", [pytest.param(c, id=t) for t, cs in GRAD_CASES.items() for c in cs])
def test_grad(case):
    check_grad(case)


def _build(text, shape):
    return L.build_layer(parse_text('name: "v" ' + text, caffe_pb2.LayerParameter()), [shape])


def test_deconvolution_blob_shapes_and_default_fillers():
    m = _build(DECONV, X.shape)
    assert [tuple(b.shape) for b in m.blobs()] == [(4, 3, 2, 3), (6,)]  # caffe: num_input x num_output / group
    assert m.top_shapes() == [(2, 6, 2 * 4 + 1 + 1 - 2, 2 * 5 + 2 * 2 + 1 - 2)]
    assert not isinstance(m, L.Convolution)  # pruning treats only Convolution as a prunable conv


@pytest.mark.parametrize(
    "text,match",
    [
        ('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 }', "STOCHASTIC pooling is refused: Caffe"),
        ('type: "SPP" spp_param { pyramid_height: 2 pool: STOCHASTIC }', "STOCHASTIC pooling is refused"),
        ('type: "Pooling" pooling_param { kernel_size: 2 pad: 2 }', r"pad \(2, 2\) must be smaller than kernel"),
        ('type: "SPP" spp_param { }', "pyramid_height must be positive"),
        ('type: "Deconvolution" convolution_param { num_output: 3 kernel_size: 2 group: 2 }', "multiples of group"),
        ('type: "Im2col" convolution_param { kernel_size: 2 stride: 0 }', "must be positive"),
        ('type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 1 axis: 2 }', "only axis 1"),
    ],
)
def test_refused_settings_name_the_layer(text, match):
    with pytest.raises(PrototxtError, match=f"layer 'v' .*{match}"):
        _build(text, X.shape)
