"""Neuron layers: element-wise activations, one bottom to one top of its shape (BVLC Caffe's
include/caffe/neuron_layers.hpp): ReLU, Sigmoid, TanH, Dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resnet_imagenet.net.layers.base import CaffeLayer, register


@register("ReLU")
class ReLU(CaffeLayer):
    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.negative_slope = param.relu_param.negative_slope
        self.inplace = False  # set by CaffeNet where overwriting the bottom is safe

    def forward(self, x):
        if self.negative_slope:
            return F.leaky_relu(x, self.negative_slope, inplace=self.inplace)
        return F.relu_(x) if self.inplace else F.relu(x)


@register("Sigmoid")
class Sigmoid(CaffeLayer):
    def forward(self, x):
        return torch.sigmoid(x)


@register("TanH")
class TanH(CaffeLayer):
    def forward(self, x):
        return torch.tanh(x)


@register("Dropout")
class Dropout(CaffeLayer):
    """Caffe scales kept units by 1/(1-p) while training (inverted dropout), as torch does."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.p = param.dropout_param.dropout_ratio

    def forward(self, x):
        return F.dropout(x, self.p, self.training)
