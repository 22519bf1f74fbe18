"""Caffe's lr policies against values computed by hand from sgd_solver.cpp's GetLearningRate formulas."""

from __future__ import annotations

import pytest

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text
from resnet_imagenet.solver.lr_policy import learning_rate, multistep_count


def solver(text: str) -> caffe_pb2.SolverParameter:
    return parse_text(text, caffe_pb2.SolverParameter())


def schedule(text: str, n: int) -> list[float]:
    sp = solver(text)
    return [learning_rate(sp, it) for it in range(n)]


def test_fixed():
    assert schedule('lr_policy: "fixed" base_lr: 0.5', 4) == [0.5] * 4


def test_step():
    got = schedule('lr_policy: "step" base_lr: 0.1 gamma: 0.1 stepsize: 3', 10)
    want = [0.1] * 3 + [0.01] * 3 + [0.001] * 3 + [0.0001]
    assert got == pytest.approx(want, rel=1e-6)


def test_exp():
    got = schedule('lr_policy: "exp" base_lr: 1 gamma: 0.5', 5)
    assert got == [1, 0.5, 0.25, 0.125, 0.0625]


def test_inv():
    sp = solver('lr_policy: "inv" base_lr: 0.01 gamma: 0.0001 power: 0.75')
    assert learning_rate(sp, 0) == pytest.approx(0.01, rel=1e-6)
    # (1 + 1e-4 * 10000) ^ -0.75 = 2 ^ -0.75 = 0.5946035575
    assert learning_rate(sp, 10000) == pytest.approx(0.005946035575, rel=1e-6)
    # (1 + 1e-4 * 30000) ^ -0.75 = 4 ^ -0.75 = 0.3535533906
    assert learning_rate(sp, 30000) == pytest.approx(0.003535533906, rel=1e-6)


def test_multistep_including_caffe_one_step_per_iteration():
    got = schedule('lr_policy: "multistep" base_lr: 1 gamma: 0.5 stepvalue: 2 stepvalue: 5 stepvalue: 5', 9)
    # caffe: the counter moves at most once per iteration, so the repeated 5 takes effect at 6
    assert got == [1, 1, 0.5, 0.5, 0.5, 0.25, 0.125, 0.125, 0.125]
    # unsorted stepvalues: 4 is passed at 4, then 2 at the next iteration
    assert [multistep_count([4, 2], it) for it in range(7)] == [0, 0, 0, 0, 1, 2, 2]


def test_poly():
    got = schedule('lr_policy: "poly" base_lr: 1 power: 2 max_iter: 4', 5)
    assert got == [1, 0.5625, 0.25, 0.0625, 0]


def test_sigmoid():
    got = schedule('lr_policy: "sigmoid" base_lr: 1 gamma: 1 stepsize: 2', 5)
    assert got == pytest.approx([0.1192029220, 0.2689414214, 0.5, 0.7310585786, 0.8807970780], rel=1e-9)


def test_sigmoid_decays_with_negative_gamma_and_saturates_without_overflow():
    got = schedule('lr_policy: "sigmoid" base_lr: 1 gamma: -1 stepsize: 2', 5)
    assert got == pytest.approx([0.8807970780, 0.7310585786, 0.5, 0.2689414214, 0.1192029220], rel=1e-9)
    far = solver('lr_policy: "sigmoid" base_lr: 1 gamma: 1 stepsize: 1000')
    assert learning_rate(far, 0) == 0.0  # caffe: exp(1000) is inf, the rate 0
