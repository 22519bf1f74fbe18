"""Reductions and normalizations over trailing axes (BVLC Caffe's mvn_layer.cpp, reduction_layer.cpp,
argmax_layer.cpp): MVN, Reduction, ArgMax."""

from __future__ import annotations

import math

import torch

from resnet_imagenet.net.layers.base import CaffeLayer, register
from resnet_imagenet.net.layers.shape import canonical_axis
from resnet_imagenet.proto import caffe_pb2


@register("MVN")
class MVN(CaffeLayer):
    """caffe: mvn_layer.cpp -- subtract the mean over each (item, channel) (each item when across_channels)
    and, with normalize_variance, divide by sqrt(E[(x - mean)^2]) + eps (eps outside the root, as Caffe).
    The gradient is autograd's exact one; Caffe's hand-written backward drops terms of order eps."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.mvn_param
        if len(bottom_shapes[0]) < 2 and not p.across_channels:
            raise ValueError(f"needs N x C x ... input (or across_channels), got shape {bottom_shapes[0]}")
        self.start = 1 if p.across_channels else 2
        self.normalize_variance, self.eps = p.normalize_variance, p.eps

    def forward(self, x):
        dims = tuple(range(self.start, x.dim()))
        if not dims:  # caffe: an empty spatial extent -- each value is its own mean
            return x - x
        centred = x - x.mean(dims, keepdim=True)
        if not self.normalize_variance:
            return centred
        return centred / (centred.pow(2).mean(dims, keepdim=True).sqrt() + self.eps)


@register("Reduction")
class Reduction(CaffeLayer):
    """caffe: reduction_layer.cpp -- SUM, ASUM (sum of |x|), SUMSQ or MEAN over all axes from ``axis`` on,
    times coeff; the top keeps the axes before ``axis`` (axis 0: a scalar)."""

    _OPS = {
        caffe_pb2.ReductionParameter.SUM: lambda v: v.sum(-1),
        caffe_pb2.ReductionParameter.ASUM: lambda v: v.abs().sum(-1),
        caffe_pb2.ReductionParameter.SUMSQ: lambda v: v.pow(2).sum(-1),
        caffe_pb2.ReductionParameter.MEAN: lambda v: v.mean(-1),
    }

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.reduction_param
        shape = bottom_shapes[0]
        self.axis = canonical_axis(p.axis, len(shape)) if shape else 0
        self.op, self.coeff = self._OPS[p.operation], p.coeff

    def top_shapes(self):
        return [self.bottom_shapes[0][: self.axis]]

    def forward(self, x):
        v = x.reshape(*x.shape[: self.axis], math.prod(x.shape[self.axis :]))
        out = self.op(v)
        return out if self.coeff == 1 else out * self.coeff


@register("ArgMax")
class ArgMax(CaffeLayer):
    """caffe: argmax_layer.cpp -- the top_k indices (or, with out_max_val and axis, values) along ``axis``;
    without axis, over each item flattened, the top N x 1 x top_k (N x 2 x top_k with out_max_val: indices
    then values), at least 3 axes. Ties rank the larger index first (std::greater on (value, index)).
    Caffe has no backward (NOT_IMPLEMENTED): the top carries no gradient."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.argmax_param
        shape = bottom_shapes[0]
        self.out_max_val, self.top_k = p.out_max_val, p.top_k
        self.axis = canonical_axis(p.axis, len(shape)) if p.HasField("axis") else None
        dim = shape[self.axis] if self.axis is not None else math.prod(shape[1:])
        if not 1 <= self.top_k <= dim:
            raise ValueError(f"top_k {self.top_k} must be in 1..{dim}")

    def top_shapes(self):
        shape = self.bottom_shapes[0]
        if self.axis is not None:
            return [shape[: self.axis] + (self.top_k,) + shape[self.axis + 1 :]]
        out = [1] * max(3, len(shape))
        out[0], out[1], out[2] = shape[0], 2 if self.out_max_val else 1, self.top_k
        return [tuple(out)]

    def forward(self, x):
        x = x.detach()
        v = x.movedim(self.axis, -1) if self.axis is not None else x.reshape(x.shape[0], -1)
        dim = v.shape[-1]
        vals, fidx = v.flip(-1).sort(dim=-1, descending=True, stable=True)  # flipped: ties give the larger index
        vals, idx = vals[..., : self.top_k], (dim - 1 - fidx[..., : self.top_k]).to(x.dtype)
        if self.axis is not None:
            return (vals if self.out_max_val else idx).movedim(-1, self.axis)
        out = torch.stack([idx, vals], 1) if self.out_max_val else idx.unsqueeze(1)
        return out.reshape(self.top_shapes()[0])
