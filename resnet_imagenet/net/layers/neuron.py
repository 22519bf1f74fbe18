"""Neuron layers: element-wise functions, one bottom to one top of its shape (BVLC Caffe's
include/caffe/layers/*neuron* and src/caffe/layers/<type>_layer.cpp): ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal,
BNLL, Clip, Exp, Log, Power, Swish, Threshold, Dropout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from resnet_imagenet.net.layers.base import CaffeLayer, fill_, filler_of, register


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


@register("PReLU")
class PReLU(CaffeLayer):
    """caffe: prelu_layer.cpp -- y = max(0, x) + a_c * min(0, x), one learnable slope per channel (axis 1),
    or a single 0-axis blob when channel_shared; the default filler is constant 0.25."""

    blob_names = ("weight",)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.prelu_param
        shape = bottom_shapes[0]
        if len(shape) < 2:
            raise ValueError(f"needs a bottom with at least 2 axes, got shape {shape}")
        self.weight = nn.Parameter(torch.empty(() if p.channel_shared else (shape[1],)))
        fill_(self.weight, filler_of(p, "filler"), default=0.25)
        self.view = () if p.channel_shared else (shape[1],) + (1,) * (len(shape) - 2)

    def forward(self, x):
        return x.clamp(min=0) + self.weight.reshape(self.view) * x.clamp(max=0)


@register("ELU")
class ELU(CaffeLayer):
    """caffe: elu_layer.cpp -- x > 0 ? x : alpha * (exp(x) - 1)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.alpha = param.elu_param.alpha

    def forward(self, x):
        return torch.where(x > 0, x, self.alpha * torch.expm1(x.clamp(max=0)))


@register("Sigmoid")
class Sigmoid(CaffeLayer):
    def forward(self, x):
        return torch.sigmoid(x)


@register("TanH")
class TanH(CaffeLayer):
    def forward(self, x):
        return torch.tanh(x)


@register("AbsVal")
class AbsVal(CaffeLayer):
    """caffe: absval_layer.cpp -- |x|; the gradient is sign(x) (0 at 0)."""

    def forward(self, x):
        return x.abs()


@register("BNLL")
class BNLL(CaffeLayer):
    """caffe: bnll_layer.cpp -- log(1 + exp(x)) written as x + log(1 + exp(-x)) for x > 0 (no overflow)."""

    def forward(self, x):
        return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


@register("Clip")
class Clip(CaffeLayer):
    """caffe: clip_layer.cpp -- max(min, min(max, x)); the gradient passes where min <= x <= max."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise ValueError("clip_param needs both min and max")
        if p.min > p.max:
            raise ValueError(f"clip_param min {p.min} is greater than max {p.max}")
        self.min, self.max = p.min, p.max

    def forward(self, x):
        return x.clamp(self.min, self.max)


def _log_base(base: float) -> float:
    """caffe: exp_layer.cpp / log_layer.cpp -- base -1 means e; any other base must be positive."""
    if base == -1:
        return 1.0
    if base <= 0:
        raise ValueError(f"base must be strictly positive (or -1 for e), got {base}")
    return math.log(base)


@register("Exp")
class Exp(CaffeLayer):
    """caffe: exp_layer.cpp -- y = base ^ (shift + scale * x)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.exp_param
        self.ln_base, self.scale, self.shift = _log_base(p.base), p.scale, p.shift

    def forward(self, x):
        return torch.exp(self.ln_base * (self.shift + self.scale * x))


@register("Log")
class Log(CaffeLayer):
    """caffe: log_layer.cpp -- y = log_base(shift + scale * x)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.log_param
        self.ln_base, self.scale, self.shift = _log_base(p.base), p.scale, p.shift

    def forward(self, x):
        return torch.log(self.shift + self.scale * x) / self.ln_base


@register("Power")
class Power(CaffeLayer):
    """caffe: power_layer.cpp -- y = (shift + scale * x) ^ power; power 0 (or scale 0) gives zero gradient."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.power_param
        self.power, self.scale, self.shift = p.power, p.scale, p.shift

    def forward(self, x):
        if self.power == 0 or self.scale == 0:
            return torch.full_like(x, self.shift**self.power)
        base = self.shift + self.scale * x
        return base if self.power == 1 else base.pow(self.power)


@register("Swish")
class Swish(CaffeLayer):
    """caffe: swish_layer.cpp -- y = x * sigmoid(beta * x)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.beta = param.swish_param.beta

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


@register("Threshold")
class Threshold(CaffeLayer):
    """caffe: threshold_layer.cpp -- y = 1 if x > threshold else 0; Caffe has no backward (NOT_IMPLEMENTED),
    so the top carries no gradient."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.threshold = param.threshold_param.threshold

    def forward(self, x):
        return (x.detach() > self.threshold).to(x.dtype)


@register("Dropout")
class Dropout(CaffeLayer):
    """caffe: dropout_layer.cpp -- TRAIN keeps each unit with probability 1 - p and scales it by 1 / (1 - p)
    (inverted dropout, as torch does); TEST passes the input through."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.p = param.dropout_param.dropout_ratio
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {self.p}")

    def forward(self, x):
        return F.dropout(x, self.p, self.training)
