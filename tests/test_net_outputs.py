"""A net's outputs in Caffe's order, and deploy nets from train_val nets with every kind of data layer."""

from __future__ import annotations

import torch

from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text

UNSORTED = """
name: "order"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "z" type: "ReLU" bottom: "x" top: "zeta" }
layer { name: "m" type: "TanH" bottom: "zeta" top: "mu" }
layer { name: "a" type: "Sigmoid" bottom: "zeta" top: "alpha" }
layer { name: "B" type: "AbsVal" bottom: "x" top: "Beta" }
"""


def test_outputs_are_listed_by_name_as_caffe_does():
    # caffe: net.cpp Init -- the unconsumed blobs are a std::set<string>: byte order, capitals first
    net = load_net(parse_text(UNSORTED, caffe_pb2.NetParameter()))
    assert net.output_names == ["Beta", "alpha", "mu"]
    assert list(net(torch.zeros(2, 3))) == ["Beta", "alpha", "mu"]
