"""Element-wise, shape, normalization, loss and selection layers of the registry (see layers.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from resnet_imagenet.net.layers.base import CaffeLayer, register
from resnet_imagenet.proto import caffe_pb2


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


@register("LRN")
class LRN(CaffeLayer):
    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.lrn_param
        if p.local_size % 2 == 0:
            raise ValueError(f"local_size must be odd, got {p.local_size}")
        self.size, self.alpha, self.beta, self.k = p.local_size, p.alpha, p.beta, p.k
        self.across = p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS

    def forward(self, x):
        if self.across:
            # caffe: scale = k + alpha / n * sum over n neighbouring channels of x^2; y = x * scale^-beta
            return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)
        # caffe: WITHIN_CHANNEL -- (1 + alpha * avg over a size x size window of x^2)^-beta,
        # the average counting the zero padding
        pad = (self.size - 1) // 2
        avg = F.avg_pool2d(x * x, self.size, 1, pad, count_include_pad=True)
        return x * (1.0 + self.alpha * avg).pow(-self.beta)


@register("Softmax")
class Softmax(CaffeLayer):
    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.axis = param.softmax_param.axis % len(bottom_shapes[0])

    def forward(self, x):
        return F.softmax(x, self.axis)


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
