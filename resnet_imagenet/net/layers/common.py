"""Common layers with arithmetic: InnerProduct, BatchNorm, Scale, Bias, Eltwise, Softmax, Embed, Parameter
(BVLC Caffe's common layers; each has its own header in include/caffe/layers/). The layers that only move
values are in shape.py, the reductions and normalizations (MVN, Reduction, ArgMax) in reduce.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from resnet_imagenet.net.layers.base import CaffeLayer, Shape, fill_, filler_of, register
from resnet_imagenet.net.layers.shape import canonical_axis
from resnet_imagenet.proto import caffe_pb2


@register("InnerProduct")
class InnerProduct(CaffeLayer):
    blob_names = ("weight", "bias")

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.inner_product_param
        shape = bottom_shapes[0]
        self.axis = canonical_axis(p.axis, len(shape))
        k = math.prod(shape[self.axis :])
        self.transpose = p.transpose
        self.weight = nn.Parameter(torch.empty((k, p.num_output) if p.transpose else (p.num_output, k)))
        fill_(self.weight, filler_of(p, "weight_filler"))
        self.bias = None
        if p.bias_term:
            self.bias = nn.Parameter(torch.empty(p.num_output))
            fill_(self.bias, filler_of(p, "bias_filler"))
        self.num_output = p.num_output

    def top_shapes(self):
        return [self.bottom_shapes[0][: self.axis] + (self.num_output,)]

    def macs(self) -> int:
        """Per image (the first axis): outputs x inputs for each position of the axes before ``axis``."""
        return self.weight.numel() * math.prod(self.bottom_shapes[0][1 : self.axis])

    def forward(self, x):
        x = x.flatten(self.axis)
        w = self.weight.t() if self.transpose else self.weight
        return F.linear(x, w, self.bias)


@register("BatchNorm")
class BatchNorm(CaffeLayer):
    """Caffe's BatchNorm: no affine; three blobs (mean sum, variance sum, scale factor).

    Stored statistics are divided by the scale factor at use (caffe: batch_norm_layer.cpp).
    Batch statistics are used when training unless use_global_stats says otherwise.
    """

    blob_names = ("mean", "variance", "scale_factor")

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.batch_norm_param
        c = bottom_shapes[0][1]
        self.use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else None
        self.maf = p.moving_average_fraction
        self.eps = p.eps
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("variance", torch.zeros(c))
        self.register_buffer("scale_factor", torch.zeros(1))

    def global_stats(self) -> bool:
        return (not self.training) if self.use_global_stats is None else self.use_global_stats

    def forward(self, x, weight=None, bias=None):
        if self.global_stats():
            sf = self.scale_factor[0]
            inv = torch.where(sf == 0, torch.zeros_like(sf), 1.0 / sf)
            return F.batch_norm(x, self.mean * inv, self.variance * inv, weight, bias, False, 0.0, self.eps)
        # With momentum 1 torch's running buffers receive exactly this batch's mean and its
        # unbiased variance (m / (m - 1) correction, as Caffe), computed in the same kernel.
        batch_mean = torch.zeros_like(self.mean)
        batch_var = torch.zeros_like(self.variance)
        y = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, self.eps)
        with torch.no_grad():
            # caffe: blobs = batch stat + moving_average_fraction * blobs; factor = factor * maf + 1
            self.scale_factor.mul_(self.maf).add_(1.0)
            self.mean.mul_(self.maf).add_(batch_mean)
            self.variance.mul_(self.maf).add_(batch_var)
        return y


def _operand_shape(p, bottom_shapes, what: str) -> tuple[int, Shape]:
    """caffe: scale_layer.cpp / bias_layer.cpp -- the axis and the shape of the second operand: the second
    bottom's (axis 0 when it has no axes), else bottom[axis : axis + num_axes] (num_axes -1: to the end)."""
    shape = bottom_shapes[0]
    if len(bottom_shapes) == 2:
        pshape = tuple(bottom_shapes[1])
        axis = 0 if not pshape else canonical_axis(p.axis, len(shape))
    else:
        axis = canonical_axis(p.axis, len(shape)) if shape else 0
        if p.num_axes < -1:
            raise ValueError(f"num_axes must be -1 or non-negative, got {p.num_axes}")
        end = len(shape) if p.num_axes == -1 else axis + p.num_axes
        if end > len(shape):
            raise ValueError(f"{what} blob of {p.num_axes} axes from axis {axis} exceeds input shape {shape}")
        pshape = shape[axis:end]
    if shape[axis : axis + len(pshape)] != pshape:
        raise ValueError(f"{what} shape {pshape} does not match input {shape} at axis {axis}")
    return axis, pshape


@register("Scale")
class Scale(CaffeLayer):
    """y = x * scale (+ bias), the scale learned (one bottom, default filler constant 1) or a second bottom."""

    blob_names = ("weight", "bias")
    n_bottoms = (1, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.scale_param
        self.axis, pshape = _operand_shape(p, bottom_shapes, "scale")
        self.weight = None
        if len(bottom_shapes) == 1:
            self.weight = nn.Parameter(torch.empty(pshape))
            fill_(self.weight, filler_of(p, "filler"), default=1.0)
        self.view = tuple(pshape) + (1,) * (len(bottom_shapes[0]) - self.axis - len(pshape))
        self.bias = None
        if p.bias_term:
            self.bias = nn.Parameter(torch.empty(pshape))
            fill_(self.bias, filler_of(p, "bias_filler"), default=0.0)

    def forward(self, x, scale=None):
        s = (self.weight if scale is None else scale).reshape(self.view)
        if self.bias is None:
            return x * s
        return torch.addcmul(self.bias.reshape(self.view), x, s)


@register("Bias")
class Bias(CaffeLayer):
    """caffe: bias_layer.cpp -- y = x + b, b learned (one bottom; filler default constant 0) or a second
    bottom, broadcast from ``axis`` over the remaining axes."""

    blob_names = ("bias",)
    n_bottoms = (1, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.bias_param
        self.axis, pshape = _operand_shape(p, bottom_shapes, "bias")
        self.bias = None
        if len(bottom_shapes) == 1:
            self.bias = nn.Parameter(torch.empty(pshape))
            fill_(self.bias, filler_of(p, "filler"), default=0.0)
        self.view = tuple(pshape) + (1,) * (len(bottom_shapes[0]) - self.axis - len(pshape))

    def forward(self, x, bias=None):
        return x + (self.bias if bias is None else bias).reshape(self.view)


@register("Eltwise")
class Eltwise(CaffeLayer):
    """caffe: eltwise_layer.cpp -- PROD, SUM (with coeff) or MAX of equal-shaped bottoms. stable_prod_grad only
    picks how Caffe computes PROD's gradient (product of the other bottoms, or top / bottom); autograd's is the
    product of the others, the same function."""

    n_bottoms = (2, 1 << 30)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.eltwise_param
        if any(s != bottom_shapes[0] for s in bottom_shapes):
            raise ValueError(f"bottoms must have equal shapes, got {bottom_shapes}")
        self.op = p.operation
        self.coeff = list(p.coeff) or [1.0] * len(bottom_shapes)
        if len(self.coeff) != len(bottom_shapes):
            raise ValueError(f"coeff has {len(self.coeff)} values for {len(bottom_shapes)} bottoms")
        if p.coeff and self.op == caffe_pb2.EltwiseParameter.PROD:
            raise ValueError("coeff is only for operation SUM")  # caffe: refused for PROD, ignored for MAX
        self.inplace_index: int | None = None  # set by CaffeNet: SUM into this bottom where that is safe

    def forward(self, *xs, inplace: bool = False):
        if inplace and self.inplace_index is not None:
            return self._sum_into(xs, self.inplace_index)
        if self.op == caffe_pb2.EltwiseParameter.SUM:
            if all(c == 1.0 for c in self.coeff):
                out = xs[0] + xs[1]
                for x in xs[2:]:
                    out = out + x
                return out
            out = xs[0] * self.coeff[0]
            for c, x in zip(self.coeff[1:], xs[1:]):
                out = torch.add(out, x, alpha=c)
            return out
        if self.op == caffe_pb2.EltwiseParameter.MAX:
            # caffe: eltwise_layer.cpp -- the gradient goes to one bottom: bottom 1 on a tie of bottoms 0 and 1,
            # else the first that reaches the maximum; stacked in that order, max() picks it
            order = [xs[1], xs[0], *xs[2:]]
            return torch.stack(order).max(0).values
        out = xs[0]
        for x in xs[1:]:
            out = out * x
        return out

    def _sum_into(self, xs, i: int):
        """SUM computed into ``xs[i]`` (whose coefficient is 1)."""
        out = xs[i]
        for j, x in enumerate(xs):
            if j != i:
                out = out.add_(x, alpha=self.coeff[j])
        return out


@register("Softmax")
class Softmax(CaffeLayer):
    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.axis = canonical_axis(param.softmax_param.axis, len(bottom_shapes[0]))

    def forward(self, x):
        return F.softmax(x, self.axis)


@register("Embed")
class Embed(CaffeLayer):
    """caffe: embed_layer.cpp -- each bottom value (an integer index below input_dim) becomes row ``index`` of
    the input_dim x num_output weight (+ bias); top shape is the bottom's plus num_output. Caffe computes no
    gradient for the indices."""

    blob_names = ("weight", "bias")

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.embed_param
        if p.num_output <= 0 or p.input_dim <= 0:
            raise ValueError(f"num_output ({p.num_output}) and input_dim ({p.input_dim}) must be positive")
        self.num_output = p.num_output
        self.weight = nn.Parameter(torch.empty(p.input_dim, p.num_output))
        fill_(self.weight, filler_of(p, "weight_filler"))
        self.bias = None
        if p.bias_term:
            self.bias = nn.Parameter(torch.empty(p.num_output))
            fill_(self.bias, filler_of(p, "bias_filler"))

    def top_shapes(self):
        return [self.bottom_shapes[0] + (self.num_output,)]

    def forward(self, x):
        idx = x.detach().long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.weight.shape[0] or (idx != x.detach()).any()):
            raise ValueError(f"layer '{self.name}': Embed inputs must be integers in 0..{self.weight.shape[0] - 1}")
        out = F.embedding(idx, self.weight)
        return out if self.bias is None else out + self.bias


@register("Parameter")
class Parameter(CaffeLayer):
    """caffe: parameter_layer.hpp -- no bottom; the top is the layer's one learnable blob, of parameter_param's
    shape (zeros until trained or loaded, as Caffe's new Blob)."""

    blob_names = ("weight",)
    n_bottoms = (0, 0)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        shape = tuple(param.parameter_param.shape.dim)
        if any(d < 0 for d in shape):
            raise ValueError(f"parameter_param.shape {shape} has a negative dimension")
        self.weight = nn.Parameter(torch.zeros(shape))

    def top_shapes(self):
        return [tuple(self.weight.shape)]

    def forward(self):
        return self.weight
