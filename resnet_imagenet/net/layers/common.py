"""Common layers: InnerProduct, BatchNorm, Scale, Eltwise, Concat, Flatten, Split, Softmax, Filter
(BVLC Caffe's include/caffe/common_layers.hpp; Scale has its own header there, scale_layer.hpp)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from resnet_imagenet.net.layers.base import CaffeLayer, fill_, filler_of, register
from resnet_imagenet.proto import caffe_pb2


@register("InnerProduct")
class InnerProduct(CaffeLayer):
    blob_names = ("weight", "bias")

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.inner_product_param
        shape = bottom_shapes[0]
        self.axis = p.axis % len(shape)
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


@register("Scale")
class Scale(CaffeLayer):
    """y = x * scale (+ bias), the scale learned (one bottom) or given as a second bottom."""

    blob_names = ("weight", "bias")
    n_bottoms = (1, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.scale_param
        shape = bottom_shapes[0]
        self.axis = p.axis % len(shape) if shape else 0
        if len(bottom_shapes) == 2:
            pshape = bottom_shapes[1]
            self.weight = None
        else:
            end = len(shape) if p.num_axes == -1 else self.axis + p.num_axes
            pshape = shape[self.axis : end]
            self.weight = nn.Parameter(torch.empty(pshape))
            fill_(self.weight, filler_of(p, "filler"), default=1.0)
        if shape[self.axis : self.axis + len(pshape)] != tuple(pshape):
            raise ValueError(f"scale shape {pshape} does not match input {shape} at axis {self.axis}")
        self.view = tuple(pshape) + (1,) * (len(shape) - self.axis - len(pshape))
        self.bias = None
        if p.bias_term:
            self.bias = nn.Parameter(torch.empty(pshape))
            fill_(self.bias, filler_of(p, "bias_filler"), default=0.0)

    def forward(self, x, scale=None):
        s = (self.weight if scale is None else scale).reshape(self.view)
        if self.bias is None:
            return x * s
        return torch.addcmul(self.bias.reshape(self.view), x, s)


@register("Eltwise")
class Eltwise(CaffeLayer):
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
        reduce = torch.mul if self.op == caffe_pb2.EltwiseParameter.PROD else torch.maximum
        out = xs[0]
        for x in xs[1:]:
            out = reduce(out, x)
        return out

    def _sum_into(self, xs, i: int):
        """SUM computed into ``xs[i]`` (whose coefficient is 1)."""
        out = xs[i]
        for j, x in enumerate(xs):
            if j != i:
                out = out.add_(x, alpha=self.coeff[j])
        return out


@register("Concat")
class Concat(CaffeLayer):
    n_bottoms = (1, 1 << 30)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.concat_param
        axis = p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim
        self.axis = axis % len(bottom_shapes[0])
        for s in bottom_shapes:
            if len(s) != len(bottom_shapes[0]) or any(
                a != b for i, (a, b) in enumerate(zip(s, bottom_shapes[0])) if i != self.axis
            ):
                raise ValueError(f"bottom shapes {bottom_shapes} differ outside axis {self.axis}")

    def top_shapes(self):
        s = list(self.bottom_shapes[0])
        s[self.axis] = sum(b[self.axis] for b in self.bottom_shapes)
        return [tuple(s)]

    def forward(self, *xs):
        return torch.cat(xs, self.axis)


@register("Flatten")
class Flatten(CaffeLayer):
    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        n = len(bottom_shapes[0])
        self.start = param.flatten_param.axis % n
        self.end = param.flatten_param.end_axis % n

    def top_shapes(self):
        s = self.bottom_shapes[0]
        return [s[: self.start] + (math.prod(s[self.start : self.end + 1]),) + s[self.end + 1 :]]

    def forward(self, x):
        return x.flatten(self.start, self.end)


@register("Split")
class Split(CaffeLayer):
    """One bottom shared by several tops (Caffe inserts these itself; prototxts may too)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.n_tops = max(1, len(param.top))

    def top_shapes(self):
        return [self.bottom_shapes[0]] * self.n_tops

    def forward(self, x):
        return (x,) * self.n_tops


@register("Softmax")
class Softmax(CaffeLayer):
    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.axis = param.softmax_param.axis % len(bottom_shapes[0])

    def forward(self, x):
        return F.softmax(x, self.axis)


@register("Filter")
class Filter(CaffeLayer):
    """caffe-pro's channel sampler: keep the channels whose selector blob entry is non-zero."""

    blob_names = ("selector",)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.filter_param
        self.axis = p.axis % len(bottom_shapes[0])
        self.num_output = p.num_output
        c = bottom_shapes[0][self.axis]
        if not 0 < self.num_output <= c:
            raise ValueError(f"filter_param.num_output {self.num_output} must be in 1..{c}")
        sel = torch.zeros(c)
        sel[: self.num_output] = 1.0
        self.register_buffer("selector", sel)

    def top_shapes(self):
        s = list(self.bottom_shapes[0])
        s[self.axis] = self.num_output
        return [tuple(s)]

    def forward(self, x):
        idx = self.selector.nonzero().flatten()
        if idx.numel() != self.num_output:
            raise ValueError(
                f"layer '{self.name}': selector keeps {idx.numel()} channels, num_output is {self.num_output}"
            )
        return x.index_select(self.axis, idx.to(x.device))
