"""Neuron layers against Caffe's formulas (src/caffe/layers/<type>_layer.cpp), forward in numpy and gradients
by finite differences. Inputs stay away from kinks (0, clip bounds, the threshold) so gradcheck is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnet_imagenet.net import layers as L
from tests._layer_cases import Case, build, check_grad, check_value

RNG = np.random.default_rng(0)
X = np.array([[[-2.0, -0.7], [0.3, 1.9]], [[-0.2, 0.8], [-1.4, 2.6]]]).reshape(2, 2, 2, 1)  # N=2 C=2 H=2 W=1
POS = np.abs(X) + 0.5  # for Log / Power of fractional powers


def f32(v: float) -> float:
    """A prototxt float as the layer sees it (float32 in caffe.proto)."""
    return float(np.float32(v))


def _sig(v):
    return 1 / (1 + np.exp(-v))


def _set_prelu(m):
    m.weight.copy_(torch.tensor([0.25, -0.5], dtype=torch.float64))


VALUE_CASES: dict[str, list[Case]] = {
    "ReLU": [
        Case('type: "ReLU"', [X], lambda x: np.maximum(x, 0)),
        # caffe: relu_layer.cpp -- max(x, 0) + negative_slope * min(x, 0)
        Case(
            'type: "ReLU" relu_param { negative_slope: 0.1 }',
            [X],
            lambda x: np.maximum(x, 0) + f32(0.1) * np.minimum(x, 0),
        ),
    ],
    "PReLU": [
        Case('type: "PReLU"', [X], lambda x: np.maximum(x, 0) + 0.25 * np.minimum(x, 0)),  # default filler 0.25
        Case(
            'type: "PReLU"',
            [X],
            lambda x: np.maximum(x, 0) + np.array([0.25, -0.5]).reshape(1, 2, 1, 1) * np.minimum(x, 0),
            setup=_set_prelu,
        ),
        Case(
            'type: "PReLU" prelu_param { channel_shared: true filler { type: "constant" value: 0.3 } }',
            [X],
            lambda x: np.maximum(x, 0) + f32(0.3) * np.minimum(x, 0),
        ),
    ],
    "ELU": [
        Case('type: "ELU"', [X], lambda x: np.where(x > 0, x, np.exp(x) - 1)),
        Case('type: "ELU" elu_param { alpha: 0.5 }', [X], lambda x: np.where(x > 0, x, 0.5 * (np.exp(x) - 1))),
    ],
    "Sigmoid": [Case('type: "Sigmoid"', [X], _sig)],
    "TanH": [Case('type: "TanH"', [X], lambda x: (np.exp(2 * x) - 1) / (np.exp(2 * x) + 1))],
    "AbsVal": [Case('type: "AbsVal"', [X], np.abs)],
    "BNLL": [
        Case('type: "BNLL"', [X], lambda x: np.log(1 + np.exp(x))),
        # caffe: the x > 0 branch x + log(1 + exp(-x)) keeps large inputs finite
        Case('type: "BNLL"', [np.array([800.0, -800.0])], lambda x: np.array([800.0, 0.0])),
    ],
    "Clip": [Case('type: "Clip" clip_param { min: -1 max: 0.5 }', [X], lambda x: np.minimum(np.maximum(x, -1), 0.5))],
    "Exp": [
        Case('type: "Exp"', [X], np.exp),
        Case('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', [X], lambda x: 2.0 ** (1 + 0.5 * x)),
    ],
    "Log": [
        Case('type: "Log"', [POS], np.log),
        Case('type: "Log" log_param { base: 10 scale: 2 shift: 1 }', [POS], lambda x: np.log10(1 + 2 * x)),
    ],
    "Power": [
        Case('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', [X], lambda x: (1 + 0.5 * x) ** 2),
        Case('type: "Power" power_param { power: 0.5 scale: 3 }', [POS], lambda x: np.sqrt(3 * x)),
        Case('type: "Power" power_param { power: 0 }', [X], lambda x: np.ones_like(x)),
        Case('type: "Power" power_param { shift: -1 }', [X], lambda x: x - 1),
    ],
    "Swish": [
        Case('type: "Swish"', [X], lambda x: x * _sig(x)),
        Case('type: "Swish" swish_param { beta: 2 }', [X], lambda x: x * _sig(2 * x)),
    ],
    "Threshold": [
        Case('type: "Threshold"', [X], lambda x: (x > 0).astype(float)),
        Case('type: "Threshold" threshold_param { threshold: 0.8 }', [X], lambda x: (x > f32(0.8)).astype(float)),
    ],
    "Dropout": [Case('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [X], lambda x: x)],  # TEST: identity
}

GRAD_CASES: dict[str, list[Case]] = {
    "ReLU": [Case('type: "ReLU" relu_param { negative_slope: 0.1 }', [X])],
    "PReLU": [
        Case('type: "PReLU"', [X], setup=_set_prelu),
        Case('type: "PReLU" prelu_param { channel_shared: true }', [X]),
    ],
    "ELU": [Case('type: "ELU" elu_param { alpha: 0.5 }', [X])],
    "Sigmoid": [Case('type: "Sigmoid"', [X])],
    "TanH": [Case('type: "TanH"', [X])],
    "AbsVal": [Case('type: "AbsVal"', [X])],
    "BNLL": [Case('type: "BNLL"', [X])],
    "Clip": [Case('type: "Clip" clip_param { min: -1 max: 0.5 }', [X])],
    "Exp": [Case('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', [X])],
    "Log": [Case('type: "Log" log_param { base: 10 scale: 2 shift: 1 }', [POS])],
    "Power": [
        Case('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', [X]),
        Case('type: "Power" power_param { power: 0.5 scale: 3 }', [POS]),
        Case('type: "Power" power_param { power: 0 }', [X]),
    ],
    "Swish": [Case('type: "Swish" swish_param { beta: 2 }', [X])],
    # caffe: threshold_layer.hpp -- Backward_cpu is NOT_IMPLEMENTED: nothing reaches the bottom
    "Threshold": [Case('type: "Threshold"', [X], no_grad=True)],
    "Dropout": [Case('type: "Dropout"', [X], train=True, seed=3)],  # the same mask for every evaluation
}


@pytest.mark.parametrize("case", [pytest.param(c, id=t) for t, cs in VALUE_CASES.items() for c in cs])
def test_value(case):
    check_value(case)


@pytest.mark.parametrize("case", [pytest.param(c, id=t) for t, cs in GRAD_CASES.items() for c in cs])
def test_grad(case):
    check_grad(case)


def test_dropout_train_keeps_and_scales_by_one_over_one_minus_ratio():
    x = np.ones((4000,))
    m = build(Case('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [x], train=True))
    y = m(torch.from_numpy(x)).numpy()
    assert set(np.unique(y).round(12)) == {0.0, round(1 / (1 - f32(0.3)), 12)}
    assert abs((y == 0).mean() - 0.3) < 0.03


def test_prelu_blob_shapes_and_bad_parameters_name_the_layer():
    m = build(Case('name: "p" type: "PReLU" prelu_param { channel_shared: true }', [X]))
    assert m.weight.shape == () and [b.shape for b in m.blobs()] == [()]
    assert build(Case('type: "PReLU"', [X])).weight.shape == (2,)
    with pytest.raises(ValueError, match="layer 'c'.*min 1.0 is greater than max"):
        build(Case('name: "c" type: "Clip" clip_param { min: 1 max: 0 }', [X]))
    with pytest.raises(ValueError, match="layer 'e'.*base must be strictly positive"):
        build(Case('name: "e" type: "Exp" exp_param { base: 0 }', [X]))
    with pytest.raises(ValueError, match="layer 'p'.*at least 2 axes"):
        build(Case('name: "p" type: "PReLU"', [np.zeros(3)]))


def test_registry_has_every_neuron_type():
    assert set(VALUE_CASES) <= set(L.LAYERS)
