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


class _CappedSoftmaxNLL(torch.autograd.Function):
    """Per item -log(max(p_label, FLT_MIN)) = min(nll, -log(FLT_MIN)); the backward is Caffe's p - onehot.

    caffe: softmax_loss_layer.cpp -- Forward_cpu: loss -= log(std::max(prob, FLT_MIN)); Backward_cpu:
    bottom_diff = prob, bottom_diff[label] -= 1 (the cap touches the value only, the gradient stays p - 1).
    The value is taken from the clamp itself, so no large nll is subtracted from another (no cancellation).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        logp = F.log_softmax(xf, dim=1)
        safe = torch.where(valid, label, torch.zeros_like(label))
        nll = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(logp, safe, valid)
        ctx.in_dtype = x.dtype
        return torch.where(valid, nll.clamp(max=_NEG_LOG_FLT_MIN), torch.zeros_like(nll))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logp, safe, valid = ctx.saved_tensors
        diff = logp.exp()
        diff.scatter_add_(1, safe.unsqueeze(1), -torch.ones_like(diff[:, :1]))
        diff = diff * (grad * valid.to(grad.dtype)).unsqueeze(1)
        return diff.to(ctx.in_dtype), None, None


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(CaffeLayer):
    """Caffe's SoftmaxWithLoss. After each forward, ``capped`` / ``count`` hold how many of the (non-ignored)
    items were at the cap -log(FLT_MIN) and how many there were: the trainer's divergence guard reads them."""

    n_bottoms = (2, 2)
    CAP = _NEG_LOG_FLT_MIN

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
        self.capped: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def top_shapes(self):
        return [()]

    def forward(self, x, label):
        label = _labels(label, x)
        valid = torch.ones_like(label, dtype=torch.bool) if self.ignore is None else label != self.ignore
        item = _CappedSoftmaxNLL.apply(x, label, valid)
        total = item.sum()
        with torch.no_grad():
            self.capped = ((item >= _NEG_LOG_FLT_MIN) & valid).sum()
            self.count = valid.sum()
        # caffe: softmax_loss_layer.cpp get_normalizer
        if self.mode == caffe_pb2.LossParameter.VALID and self.ignore is not None:
            norm = valid.sum().clamp(min=1).to(total.dtype)
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
