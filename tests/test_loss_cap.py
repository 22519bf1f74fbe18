"""SoftmaxWithLoss at huge logit gaps: Caffe's per-item value min(nll, -log(FLT_MIN)) and gradient p - 1.

caffe: softmax_loss_layer.cpp -- loss -= log(max(prob[label], FLT_MIN)); bottom_diff = prob - onehot(label).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from resnet_imagenet.net import layers as L
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text

CAP = -math.log(float(np.finfo(np.float32).tiny))  # 87.33654475...


def loss_layer(text: str = "", shape=(1, 3)) -> torch.nn.Module:
    p = parse_text(f'name: "l" type: "SoftmaxWithLoss" {text}', caffe_pb2.LayerParameter())
    return L.build_layer(p, [shape, (shape[0],)])


@pytest.mark.parametrize("gap", [10.0, 100.0, 1e4, 1e8, 1e20])
def test_value_and_gradient_at_logit_gap(gap):
    """Logits (gap, 0, 0), true class 1: nll = gap + log(1 + 2 exp(-gap)); p = softmax."""
    x = torch.tensor([[gap, 0.0, 0.0]], requires_grad=True)
    loss = loss_layer()(x, torch.tensor([1.0]))
    nll = gap + math.log1p(2 * math.exp(-gap))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(min(nll, CAP), rel=1e-6)
    loss.backward()
    e = math.exp(-gap)
    p = [1 / (1 + 2 * e), e / (1 + 2 * e), e / (1 + 2 * e)]
    want = torch.tensor([[p[0], p[1] - 1, p[2]]])  # unclamped, even where the value is capped
    torch.testing.assert_close(x.grad, want, rtol=1e-6, atol=1e-7)


def test_mixed_batch_caps_items_separately_and_counts_them():
    m = loss_layer(shape=(3, 3))
    x = torch.tensor([[1e20, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1e8, 0.0]])
    loss = m(x, torch.tensor([1.0, 2.0, 2.0]))
    assert loss.item() == pytest.approx((CAP + math.log(3) + CAP) / 3, rel=1e-6)
    assert (m.capped.item(), m.count.item()) == (2, 3)


def test_ignored_items_have_no_value_no_gradient_and_are_not_counted():
    m = loss_layer("loss_param { ignore_label: 0 }", shape=(2, 3))
    x = torch.tensor([[0.0, 1e9, 0.0], [1.0, 2.0, 3.0]], requires_grad=True)
    loss = m(x, torch.tensor([0.0, 2.0]))
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 0)
    assert loss.item() == pytest.approx(-math.log(p[2].item()), rel=1e-6)  # VALID: divided by 1
    loss.backward()
    assert x.grad[0].abs().max().item() == 0
    torch.testing.assert_close(x.grad[1], (p - torch.tensor([0, 0, 1.0], dtype=torch.float64)).float())
    assert (m.capped.item(), m.count.item()) == (0, 1)


def test_gradient_matches_finite_differences_below_the_cap():
    p = parse_text('name: "l" type: "SoftmaxWithLoss"', caffe_pb2.LayerParameter())
    m = L.build_layer(p, [(4, 5, 2, 3), (4, 1, 2, 3)])
    x = torch.randn(4, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    label = torch.randint(0, 5, (4, 1, 2, 3)).double()
    assert torch.autograd.gradcheck(lambda t: m(t, label), (x,))
