"""Accuracy over a spatial map (FCN-style: the class axis 1 with H x W positions, labels N x H x W), by hand."""

from __future__ import annotations

import pytest
import torch

from resnet_imagenet.net.layers import build_layer
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text


def accuracy(text: str, x: torch.Tensor, label: torch.Tensor):
    lp = parse_text(f'name: "acc" type: "Accuracy" bottom: "x" bottom: "y" {text}', caffe_pb2.LayerParameter())
    return build_layer(lp, [tuple(x.shape), tuple(label.shape)])(x, label)


def test_per_position_accuracy_and_per_class_top():
    # scores of 3 classes at 2 x 2 positions of one image; caffe: accuracy_layer.cpp counts each position once
    x = torch.tensor([[[[0.2, 0.6], [0.5, 0.1]], [[0.8, 0.4], [0.5, 0.2]], [[0.0, 0.0], [0.0, 0.7]]]])
    label = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    # position (0,0): class 1 best -> right; (0,1): class 0 beats 1 -> wrong; (1,0): 0 ties with 1 -> wrong (a tie
    # counts against, >= the true score); (1,1): class 2 best -> right
    acc, per_class = accuracy('top: "a" top: "per_class"', x, label)
    assert acc.item() == pytest.approx(0.5)
    assert per_class.tolist() == pytest.approx([0.0, 0.5, 1.0])  # class 0: 0/1, class 1: 1/2, class 2: 1/1
    # top_k 2: (0,1): class 1 is second -> right; (1,0): 2 scores >= the true 0.5 (itself included) -> right
    acc2 = accuracy('top: "a" accuracy_param { top_k: 2 }', x, label)
    assert acc2.item() == pytest.approx(1.0)
    # ignore_label 1: the two class-1 positions leave the count; the 2 others: (1,0) wrong, (1,1) right
    acc3, per3 = accuracy('top: "a" top: "p" accuracy_param { ignore_label: 1 }', x, label)
    assert acc3.item() == pytest.approx(0.5) and per3.tolist() == pytest.approx([0.0, 0.0, 1.0])
