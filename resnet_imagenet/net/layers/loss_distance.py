"""Loss layers, distance and margin family (BVLC Caffe's euclidean_loss, contrastive_loss, hinge_loss layers)."""

from __future__ import annotations

import math

import torch

from resnet_imagenet.net.layers.base import CaffeLayer, register
from resnet_imagenet.net.layers.loss import check_batch
from resnet_imagenet.proto import caffe_pb2


@register("EuclideanLoss")
class EuclideanLoss(CaffeLayer):
    """sum((a - b)^2) / num / 2; both bottoms get a gradient (caffe: euclidean_loss_layer.cpp)."""

    n_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_batch(bottom_shapes)
        if math.prod(bottom_shapes[0][1:]) != math.prod(bottom_shapes[1][1:]):
            raise ValueError(f"inputs {bottom_shapes[0]} and {bottom_shapes[1]} must have the same dimension")

    def top_shapes(self):
        return [()]

    def forward(self, a, b):
        diff = a.reshape(a.shape[0], -1) - b.reshape(b.shape[0], -1)
        return (diff * diff).sum() / a.shape[0] / 2


@register("ContrastiveLoss")
class ContrastiveLoss(CaffeLayer):
    """Hadsell et al.'s loss on feature pairs (a, b) and a similarity bottom y (caffe: contrastive_loss_layer.cpp):
    sum_n [y d^2 + (1 - y) max(margin - d, 0)^2] / 2N, d = ||a - b||; legacy_version uses max(margin - d^2, 0).
    Backward is Caffe's: a dissimilar pair's gradient divides by d + 1e-4 (finite at d = 0)."""

    n_bottoms = (3, 3)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        a, b, y = bottom_shapes
        if a[:2] != b[:2] or math.prod(a[2:]) != 1 or math.prod(b[2:]) != 1:
            raise ValueError(f"the pair bottoms {a} and {b} must be N x C (x 1 x 1) alike")
        if y[:1] != a[:1] or math.prod(y[1:]) != 1:
            raise ValueError(f"the similarity bottom {y} must hold one value per pair")
        p = param.contrastive_loss_param
        self.margin, self.legacy = p.margin, p.legacy_version

    def top_shapes(self):
        return [()]

    def forward(self, a, b, y):
        n = a.shape[0]
        diff = a.reshape(n, -1) - b.reshape(n, -1)
        dist_sq = (diff * diff).sum(1)
        similar = y.detach().reshape(n).trunc() != 0  # caffe: static_cast<int>(y)
        if self.legacy:
            mdist = self.margin - dist_sq
            dissimilar = mdist.clamp(min=0)
        else:
            dist = dist_sq.sqrt()
            mdist = self.margin - dist
            dissimilar = mdist.clamp(min=0) ** 2
        loss = torch.where(similar, dist_sq, dissimilar).sum() / n / 2
        # caffe's backward: d/da = coeff * (a - b) / N with coeff 1 (similar), -1 (legacy dissimilar inside the
        # margin), -(margin - d) / (d + 1e-4) (dissimilar inside the margin); 0 outside it.
        with torch.no_grad():
            inside = (mdist > 0).to(diff.dtype)
            far = -inside if self.legacy else -inside * mdist / (dist + 1e-4)
            coeff = torch.where(similar, torch.ones_like(far), far)
        surrogate = (coeff.unsqueeze(1) * diff * diff.detach()).sum() / n
        return loss.detach() + (surrogate - surrogate.detach())


@register("HingeLoss")
class HingeLoss(CaffeLayer):
    """One-vs-all hinge: t = max(0, 1 + s x) with s = -1 at the label, +1 elsewhere; sum(t) / num (L1) or
    sum(t^2) / num (L2) (caffe: hinge_loss_layer.cpp)."""

    n_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_batch(bottom_shapes)
        self.l2 = param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2

    def top_shapes(self):
        return [()]

    def forward(self, x, label):
        n = x.shape[0]
        x = x.reshape(n, -1)
        sign = torch.ones_like(x).scatter_(1, label.detach().reshape(n, 1).long(), -1.0)
        t = (1 + sign * x).clamp(min=0)
        return ((t * t) if self.l2 else t).sum() / n
