"""Loss layers, classification family (BVLC Caffe's loss_layers: softmax_loss, accuracy, sigmoid_cross_entropy_loss,
infogain_loss, multinomial_logistic_loss); distance and margin losses are in loss_distance.py.

Every loss layer's top is a scalar (caffe: LossLayer::Reshape, a 0-axis blob); labels get no gradient (caffe:
"Layer cannot backpropagate to label inputs"), so label bottoms are read detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from resnet_imagenet.net.layers.base import CaffeLayer, register
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import blob_to_array, read_binary_proto

_NEG_LOG_FLT_MIN = -math.log(torch.finfo(torch.float32).tiny)  # 87.3365
# caffe: include/caffe/layers/loss_layer.hpp -- const float kLOG_THRESHOLD = 1e-20 (its float32 value)
K_LOG_THRESHOLD = torch.tensor(1e-20, dtype=torch.float32).item()
_Norm = caffe_pb2.LossParameter


def _labels(label: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Caffe stores labels as floats; index with int64, shaped like the score map without its class axis."""
    return label.detach().reshape(like.shape[0], *like.shape[2:]).long()


def canonical_axis(axis: int, shape: tuple[int, ...]) -> int:
    """caffe: Blob::CanonicalAxisIndex -- a negative axis counts from the end."""
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} out of range for a {len(shape)}-axis bottom {shape}")
    return axis % len(shape)


def check_batch(bottom_shapes: list[tuple[int, ...]]) -> None:
    """caffe: LossLayer::Reshape -- the data and label should have the same first dimension."""
    if bottom_shapes[0][:1] != bottom_shapes[1][:1]:
        raise ValueError(f"the data {bottom_shapes[0]} and label {bottom_shapes[1]} need the same first dimension")


def loss_mode(lp: caffe_pb2.LossParameter, default: int = _Norm.VALID) -> int:
    """The normalization mode; the deprecated ``normalize`` means VALID (true) or BATCH_SIZE (false)."""
    if lp.HasField("normalization"):
        return lp.normalization
    if lp.HasField("normalize"):
        return _Norm.VALID if lp.normalize else _Norm.BATCH_SIZE
    return default


def normalizer(mode: int, outer: int, inner: int, valid: torch.Tensor | None) -> torch.Tensor | float:
    """caffe: get_normalizer (softmax_loss_layer.cpp) -- FULL outer*inner, VALID the non-ignored count
    (outer*inner without ignore_label), BATCH_SIZE outer, NONE 1; never below 1."""
    if mode == _Norm.VALID and valid is not None:
        return valid.clamp(min=1)
    if mode in (_Norm.FULL, _Norm.VALID):
        return max(1, outer * inner)
    return max(1, outer) if mode == _Norm.BATCH_SIZE else 1.0


def _ignore(lp: caffe_pb2.LossParameter) -> int | None:
    return lp.ignore_label if lp.HasField("ignore_label") else None


def _check_label_count(shape, label_shape, axis: int) -> tuple[int, int]:
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    if outer * inner != math.prod(label_shape):
        raise ValueError(
            f"{math.prod(label_shape)} labels for {outer * inner} predictions (scores {shape}, class axis {axis})"
        )
    return outer, inner


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
    """-log softmax of the label's score over softmax_param.axis; second top (optional): the softmax. After each
    forward, ``capped`` / ``count`` hold how many of the (non-ignored) items were at the cap -log(FLT_MIN) and how
    many there were: the trainer's divergence guard reads them."""

    n_bottoms = (2, 2)
    CAP = _NEG_LOG_FLT_MIN

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        lp = param.loss_param
        self.ignore = _ignore(lp)
        self.mode = loss_mode(lp)
        check_batch(bottom_shapes)
        self.axis = canonical_axis(param.softmax_param.axis, bottom_shapes[0])
        _check_label_count(bottom_shapes[0], bottom_shapes[1], self.axis)
        self.n_tops = max(1, len(param.top))
        self.capped: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def top_shapes(self):
        return [(), self.bottom_shapes[0]][: self.n_tops]

    def forward(self, x, label):
        outer, inner = math.prod(x.shape[: self.axis]), math.prod(x.shape[self.axis + 1 :])
        x = x.movedim(self.axis, 1)  # caffe: the class axis; labels follow the other axes in order
        label = _labels(label, x)
        valid = torch.ones_like(label, dtype=torch.bool) if self.ignore is None else label != self.ignore
        # caffe: loss -= log(max(prob, FLT_MIN)) per item, gradient prob - 1 (the cap is on the value only)
        item = _CappedSoftmaxNLL.apply(x, label, valid)
        total = item.sum()
        with torch.no_grad():
            self.capped = ((item >= _NEG_LOG_FLT_MIN) & valid).sum()
            self.count = valid.sum()
        n_valid = valid.sum().to(total.dtype) if self.ignore is not None else None
        loss = total / normalizer(self.mode, outer, inner, n_valid)
        if self.n_tops > 1:
            return loss, F.softmax(x, 1).movedim(1, self.axis)
        return loss


@register("Accuracy")
class Accuracy(CaffeLayer):
    """Fraction of samples whose true class is among the top_k scores; ties count against it. A second top
    gives each class's accuracy (0 for a class without samples). No backward (caffe: NOT_IMPLEMENTED)."""

    n_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.accuracy_param
        self.top_k = p.top_k
        self.ignore = p.ignore_label if p.HasField("ignore_label") else None
        self.axis = canonical_axis(p.axis, bottom_shapes[0])
        _check_label_count(bottom_shapes[0], bottom_shapes[1], self.axis)
        self.num_labels = bottom_shapes[0][self.axis]
        if self.top_k > self.num_labels:
            raise ValueError(f"top_k {self.top_k} must not exceed the {self.num_labels} classes")
        self.n_tops = max(1, len(param.top))

    def top_shapes(self):
        return [(), (self.num_labels,)][: self.n_tops]

    def forward(self, x, label):
        with torch.no_grad():
            x = x.movedim(self.axis, 1)
            label = _labels(label, x)
            valid = torch.ones_like(label, dtype=torch.bool) if self.ignore is None else label != self.ignore
            safe = torch.where(valid, label, torch.zeros_like(label))
            true_score = x.gather(1, safe.unsqueeze(1))
            # caffe: accuracy_layer.cpp -- count scores >= the true class's score (itself included);
            # correct when fewer than top_k others reach it
            better = (x >= true_score).sum(1) - 1
            hit = (better < self.top_k) & valid
            acc = hit.sum().to(x.dtype) / valid.sum().clamp(min=1).to(x.dtype)
            if self.n_tops == 1:
                return acc
            n = self.num_labels
            seen = torch.bincount(safe[valid], minlength=n).to(x.dtype)
            right = torch.bincount(safe[hit], minlength=n).to(x.dtype)
            return acc, torch.where(seen > 0, right / seen.clamp(min=1), torch.zeros_like(seen))


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(CaffeLayer):
    """-sum [t log sigmoid(x) + (1-t) log(1-sigmoid(x))] over the non-ignored targets / normalizer
    (default BATCH_SIZE); gradient (sigmoid(x) - t) / normalizer, 0 at ignored targets."""

    n_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_batch(bottom_shapes)
        if math.prod(bottom_shapes[0]) != math.prod(bottom_shapes[1]):
            raise ValueError(f"the inputs {bottom_shapes[0]} and {bottom_shapes[1]} must have the same count")
        lp = param.loss_param
        self.ignore = _ignore(lp)
        # caffe: sigmoid_cross_entropy_loss_layer.cpp -- without normalization/normalize, BATCH_SIZE
        self.mode = loss_mode(lp, default=_Norm.BATCH_SIZE)

    def top_shapes(self):
        return [()]

    def forward(self, x, target):
        t = target.detach().reshape(x.shape).to(x.dtype)
        # caffe's stable form: -[x (t - (x >= 0)) - log(1 + exp(x - 2 x (x >= 0)))] -- the same function
        per = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        valid = None
        if self.ignore is not None:
            keep = t.trunc().long() != self.ignore  # caffe: static_cast<int>(target) == ignore_label
            per = per * keep
            valid = keep.sum().to(x.dtype)
        return per.sum() / normalizer(self.mode, x.shape[0], math.prod(x.shape[1:]), valid)


def _grad_from(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` forward, ``surrogate``'s gradient backward (Caffe's backward where it is not the derivative)."""
    return value.detach() + (surrogate - surrogate.detach())


@register("MultinomialLogisticLoss")
class MultinomialLogisticLoss(CaffeLayer):
    """-sum log(max(p[label], kLOG_THRESHOLD)) / num on probabilities; gradient -1 / max(p, 1e-20) / num
    at the label (caffe: multinomial_logistic_loss_layer.cpp -- the clamp stays in the gradient too)."""

    n_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_batch(bottom_shapes)
        if math.prod(bottom_shapes[1][1:]) != 1:
            raise ValueError(f"the label {bottom_shapes[1]} must have one value per sample")

    def top_shapes(self):
        return [()]

    def forward(self, p, label):
        num = p.shape[0]
        lab = label.detach().reshape(num, 1).long()
        prob = p.reshape(num, -1).gather(1, lab).squeeze(1)
        q = prob.detach().clamp(min=K_LOG_THRESHOLD)
        return _grad_from(-torch.log(q).sum() / num, -(prob / q).sum() / num)


@register("InfogainLoss")
class InfogainLoss(CaffeLayer):
    """-sum_l H[label, l] log(max(softmax(x)_l, kLOG_THRESHOLD)) / normalizer, softmax over infogain_param.axis;
    H from infogain_loss_param.source (a BlobProto) or a third bottom. Gradient p * sum_l H[label, l] - H[label]
    (caffe: infogain_loss_layer.cpp; the clamp acts on the value only). Second top (optional): the softmax."""

    n_bottoms = (2, 3)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_batch(bottom_shapes)
        lp, ip = param.loss_param, param.infogain_loss_param
        if lp.HasField("normalize"):
            raise ValueError('loss_param.normalize is deprecated for InfogainLoss; use "normalization"')
        self.ignore = _ignore(lp)
        self.mode = lp.normalization
        self.axis = canonical_axis(ip.axis, bottom_shapes[0])
        _check_label_count(bottom_shapes[0], bottom_shapes[1], self.axis)
        self.num_labels = n = bottom_shapes[0][self.axis]
        self.n_tops = max(1, len(param.top))
        if len(bottom_shapes) == 3:
            if math.prod(bottom_shapes[2]) != n * n:
                raise ValueError(f"the infogain bottom {bottom_shapes[2]} must hold {n}x{n} values")
            h = None
        else:
            if not ip.source:
                raise ValueError("infogain_loss_param.source (the H matrix) must be given without a third bottom")
            arr = blob_to_array(read_binary_proto(ip.source, caffe_pb2.BlobProto(), "infogain matrix (BlobProto)"))
            if arr.size != n * n:
                raise ValueError(f"{ip.source}: H must be {n}x{n}, has {arr.size} values")
            h = torch.from_numpy(arr.reshape(n, n).copy())
        self.register_buffer("H", h, persistent=False)

    def top_shapes(self):
        return [(), self.bottom_shapes[0]][: self.n_tops]

    def forward(self, x, label, h=None):
        n = self.num_labels
        outer, inner = math.prod(x.shape[: self.axis]), math.prod(x.shape[self.axis + 1 :])
        x = x.movedim(self.axis, 1)
        h = (self.H if h is None else h.detach()).reshape(n, n).to(x.dtype)
        lab = _labels(label, x)
        valid = torch.ones_like(lab, dtype=torch.bool) if self.ignore is None else lab != self.ignore
        rows = h[torch.where(valid, lab, torch.zeros_like(lab))].movedim(-1, 1)  # H[label] per sample, class axis 1
        rows = rows * valid.unsqueeze(1)
        logp = F.log_softmax(x, 1)
        clamped = logp.detach().clamp(min=math.log(K_LOG_THRESHOLD))  # log(max(p, t)) = max(log p, log t)
        total = _grad_from(-(rows * clamped).sum(), -(rows * logp).sum())
        loss = total / normalizer(self.mode, outer, inner, valid.sum().to(x.dtype))
        if self.n_tops > 1:
            return loss, logp.exp().movedim(1, self.axis)
        return loss
