"""Loss layers: SoftmaxWithLoss and Accuracy (BVLC Caffe's include/caffe/loss_layers.hpp)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from resnet_imagenet.net.layers.base import CaffeLayer, register
from resnet_imagenet.proto import caffe_pb2

_NEG_LOG_FLT_MIN = -math.log(torch.finfo(torch.float32).tiny)  # 87.3365


def _labels(label: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Caffe stores labels as floats; index with int64, shaped like the score map without its class axis."""
    return label.reshape(like.shape[0], *like.shape[2:]).long()


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(CaffeLayer):
    n_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        lp = param.loss_param
        self.ignore = lp.ignore_label if lp.HasField("ignore_label") else None
        mode = lp.normalization
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            # caffe: the deprecated `normalize: false` means BATCH_SIZE
            mode = caffe_pb2.LossParameter.VALID if lp.normalize else caffe_pb2.LossParameter.BATCH_SIZE
        self.mode = mode
        if param.softmax_param.axis != 1:
            raise ValueError("only softmax axis 1 is supported")

    def top_shapes(self):
        return [()]

    def forward(self, x, label):
        label = _labels(label, x)
        ignore = -100 if self.ignore is None else self.ignore
        nll = F.cross_entropy(x, label, ignore_index=ignore, reduction="none")
        # caffe: loss -= log(max(prob, FLT_MIN)) -- each sample's loss is capped at -log(FLT_MIN), while
        # the gradient stays prob - 1 (the cap is applied to the value only)
        capped = nll.detach().clamp(max=_NEG_LOG_FLT_MIN)
        total = (nll + (capped - nll.detach())).sum()
        # caffe: softmax_loss_layer.cpp get_normalizer
        if self.mode == caffe_pb2.LossParameter.VALID and self.ignore is not None:
            norm = (label != self.ignore).sum().clamp(min=1).to(total.dtype)
        elif self.mode in (caffe_pb2.LossParameter.VALID, caffe_pb2.LossParameter.FULL):
            norm = label.numel()
        elif self.mode == caffe_pb2.LossParameter.BATCH_SIZE:
            norm = x.shape[0]
        else:
            norm = 1
        return total / norm


@register("Accuracy")
class Accuracy(CaffeLayer):
    """Fraction of samples whose true class is among the top_k scores; ties count against it."""

    n_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.accuracy_param
        self.top_k = p.top_k
        self.ignore = p.ignore_label if p.HasField("ignore_label") else None
        if p.axis != 1:
            raise ValueError("only axis 1 is supported")

    def top_shapes(self):
        return [()]

    def forward(self, x, label):
        with torch.no_grad():
            label = _labels(label, x)
            valid = torch.ones_like(label, dtype=torch.bool) if self.ignore is None else label != self.ignore
            safe = torch.where(valid, label, torch.zeros_like(label))
            true_score = x.gather(1, safe.unsqueeze(1))
            # caffe: accuracy_layer.cpp -- count scores >= the true class's score (itself included);
            # correct when fewer than top_k others reach it
            better = (x >= true_score).sum(1) - 1
            correct = ((better < self.top_k) & valid).sum()
            return correct.float() / valid.sum().clamp(min=1).float()
