"""Vision layers: Convolution, Deconvolution, Im2col, Pooling, LRN (BVLC Caffe's include/caffe/vision_layers.hpp).

Layers over N x C x H x W maps whose windows slide over H and W; their 2-D parameters follow Caffe's
rule (one value, two values, or an _h/_w pair).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resnet_imagenet.net.layers.base import CaffeLayer, Shape, fill_, filler_of, register
from resnet_imagenet.proto import caffe_pb2


def _pair(repeated: Sequence[int], h_set: bool, h: int, w: int, default: int | None, what: str) -> tuple[int, int]:
    """Caffe's 2-D parameter rule: either the repeated field (1 or 2 values) or the _h/_w pair."""
    if h_set:
        if len(repeated):
            raise ValueError(f"give either {what} or {what}_h/{what}_w, not both")
        return h, w
    if len(repeated) == 0:
        if default is None:
            raise ValueError(f"{what} is required")
        return default, default
    if len(repeated) == 1:
        return repeated[0], repeated[0]
    if len(repeated) == 2:
        return repeated[0], repeated[1]
    raise ValueError(f"{what} needs 1 or 2 values for 2-D data, got {len(repeated)}")


def _check_4d(shape: Shape) -> None:
    if len(shape) != 4:
        raise ValueError(f"expects N x C x H x W input, got shape {shape}")


def conv_geometry(p: caffe_pb2.ConvolutionParameter) -> dict[str, tuple[int, int]]:
    """kernel, stride, pad and dilation of a ConvolutionParameter (caffe: base_conv_layer.cpp LayerSetUp):
    kernel_h/_w and stride_h/_w replace kernel_size/stride and must both be positive; pad_h or pad_w alone is
    fine (the other stays 0)."""
    if p.axis != 1:
        raise ValueError("only axis 1 (channels) is supported")
    has = {f: p.HasField(f"{f}_h") or p.HasField(f"{f}_w") for f in ("kernel", "stride")}
    g = {
        "kernel": _pair(p.kernel_size, has["kernel"], p.kernel_h, p.kernel_w, None, "kernel_size"),
        "stride": _pair(p.stride, has["stride"], p.stride_h, p.stride_w, 1, "stride"),
        "pad": _pair(p.pad, p.HasField("pad_h") or p.HasField("pad_w"), p.pad_h, p.pad_w, 0, "pad"),
        "dilation": _pair(p.dilation, False, 0, 0, 1, "dilation"),
    }
    if min(g["kernel"]) <= 0 or min(g["stride"]) <= 0 or min(g["dilation"]) <= 0:
        raise ValueError(f"kernel {g['kernel']}, stride {g['stride']} and dilation {g['dilation']} must be positive")
    return g


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """caffe: conv_layer.cpp compute_output_shape -- (in + 2p - dilated kernel) / s + 1, rounded down."""
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


class _ConvBase(CaffeLayer):
    """What Convolution and Deconvolution share (caffe: base_conv_layer.cpp)."""

    blob_names = ("weight", "bias")
    transposed = False

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.convolution_param
        _check_4d(bottom_shapes[0])
        g = conv_geometry(p)
        self.kernel, self.stride, self.pad, self.dilation = g["kernel"], g["stride"], g["pad"], g["dilation"]
        self.group = p.group
        cin, cout = bottom_shapes[0][1], p.num_output
        if cout <= 0 or self.group <= 0 or cin % self.group or cout % self.group:
            raise ValueError(
                f"num_output {cout} and {cin} input channels must be positive multiples of group {p.group}"
            )
        wshape = (cin, cout // self.group) if self.transposed else (cout, cin // self.group)
        self.weight = nn.Parameter(torch.empty(*wshape, *self.kernel))
        fill_(self.weight, filler_of(p, "weight_filler"))
        self.bias = None
        if p.bias_term:
            self.bias = nn.Parameter(torch.empty(cout))
            fill_(self.bias, filler_of(p, "bias_filler"))
        if min(self.top_shapes()[0][2:]) <= 0:
            raise ValueError(f"output size {self.top_shapes()[0][2:]} of input {bottom_shapes[0]} is not positive")

    @property
    def num_output(self) -> int:
        """Output channels, read from the weight (pruning's surgery narrows it in place)."""
        return self.weight.shape[1] * self.group if self.transposed else self.weight.shape[0]

    def top_shapes(self):
        n, _, h, w = self.bottom_shapes[0]
        geo = list(zip((h, w), self.kernel, self.stride, self.pad, self.dilation))
        if self.transposed:  # caffe: deconv_layer.cpp compute_output_shape
            hw = [s * (size - 1) + d * (k - 1) + 1 - 2 * p for size, k, s, p, d in geo]
        else:
            hw = [conv_out_size(*g) for g in geo]
        return [(n, self.num_output, *hw)]

    def macs(self) -> int:
        if self.transposed:  # each input position meets every weight of its group once
            return math.prod(self.bottom_shapes[0][1:]) * math.prod(self.weight.shape[1:])
        return math.prod(self.top_shapes()[0][1:]) * math.prod(self.weight.shape[1:])

    def forward(self, x):
        if self.transposed:
            return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.pad, 0, self.group, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation, self.group)


@register("Convolution")
class Convolution(_ConvBase):
    """caffe: conv_layer.cpp -- weight num_output x num_input / group x kh x kw."""


@register("Deconvolution")
class Deconvolution(_ConvBase):
    """caffe: deconv_layer.cpp -- convolution's transpose: weight num_input x num_output / group x kh x kw,
    output (in - 1) * stride + dilated kernel - 2 * pad."""

    transposed = True


@register("Im2col")
class Im2col(CaffeLayer):
    """caffe: im2col_layer.cpp -- every kernel window as a column: N x (C * kh * kw) x oh x ow, the rows in
    (channel, kernel row, kernel column) order; convolution_param's kernel, stride, pad and dilation."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        _check_4d(bottom_shapes[0])
        g = conv_geometry(param.convolution_param)
        self.kernel, self.stride, self.pad, self.dilation = g["kernel"], g["stride"], g["pad"], g["dilation"]

    def top_shapes(self):
        n, c, h, w = self.bottom_shapes[0]
        geo = zip((h, w), self.kernel, self.stride, self.pad, self.dilation)
        return [(n, c * math.prod(self.kernel), *(conv_out_size(*g) for g in geo))]

    def forward(self, x):
        cols = F.unfold(x, self.kernel, self.dilation, self.pad, self.stride)
        return cols.reshape(self.top_shapes()[0])


@register("Pooling")
class Pooling(CaffeLayer):
    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.pooling_param
        _check_4d(bottom_shapes[0])
        if p.pool == caffe_pb2.PoolingParameter.STOCHASTIC:
            raise ValueError("STOCHASTIC pooling is refused: Caffe implements it on the GPU only (pooling_layer.cpp)")
        self.max = p.pool == caffe_pb2.PoolingParameter.MAX
        h, w = bottom_shapes[0][2:]
        # caffe: pooling_layer.cpp LayerSetUp -- each of kernel, pad, stride is given once or as an
        # _h/_w pair, never half a pair
        for f in ("kernel", "pad", "stride"):
            if p.HasField(f"{f}_h") != p.HasField(f"{f}_w"):
                raise ValueError(f"give both {f}_h and {f}_w, or {f}" + ("_size" if f == "kernel" else ""))
        if p.global_pooling:
            self.kernel = (h, w)
        else:
            kernel = [p.kernel_size] if p.HasField("kernel_size") else []
            self.kernel = _pair(kernel, p.HasField("kernel_h"), p.kernel_h, p.kernel_w, None, "kernel_size")
        self.stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
        self.pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
        if min(self.kernel) <= 0 or min(self.stride) <= 0:
            raise ValueError(f"kernel {self.kernel} and stride {self.stride} must be positive")
        if any(p >= k for p, k in zip(self.pad, self.kernel)):  # caffe: CHECK_LT(pad_h_, kernel_h_)
            raise ValueError(f"pad {self.pad} must be smaller than kernel {self.kernel}")
        self.ceil = p.round_mode == caffe_pb2.PoolingParameter.CEIL
        self.out_hw = tuple(self._caffe_size(i, (h, w)[i]) for i in range(2))
        # torch's ceil_mode follows Caffe's rule except when pad is 0 and kernel < stride, and it
        # limits pad to kernel/2; those rare cases take the explicit path below.
        self.torch_ok = all(2 * p <= k for p, k in zip(self.pad, self.kernel)) and self.out_hw == tuple(
            self._torch_size(i, (h, w)[i]) for i in range(2)
        )
        self._divisor: torch.Tensor | None = None

    def _caffe_size(self, i: int, size: int) -> int:
        k, s, p = self.kernel[i], self.stride[i], self.pad[i]
        # caffe: pooling_layer.cpp Reshape -- round up (CEIL, the default) or down, then drop a
        # last window that would start inside the right padding.
        rounder = math.ceil if self.ceil else math.floor
        out = int(rounder((size + 2 * p - k) / s)) + 1
        if any(self.pad) and (out - 1) * s >= size + p:  # caffe: `if (pad_h_ || pad_w_)`, for both axes
            out -= 1
        return out

    def _torch_size(self, i: int, size: int) -> int:
        k, s, p = self.kernel[i], self.stride[i], self.pad[i]
        out = (size + 2 * p - k + (s - 1 if self.ceil else 0)) // s + 1
        if self.ceil and (out - 1) * s >= size + p:
            out -= 1
        return out

    def top_shapes(self):
        return [self.bottom_shapes[0][:2] + self.out_hw]

    def forward(self, x):
        if self.torch_ok:
            if self.max:
                return F.max_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil)
            # caffe: AVE divides by the window clipped to the padded input (count_include_pad)
            return F.avg_pool2d(x, self.kernel, self.stride, self.pad, ceil_mode=self.ceil, count_include_pad=True)
        return self._explicit(x)

    def _explicit(self, x):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.pad
        oh, ow = self.out_hw
        h, w = x.shape[2:]
        extra_h = max(0, (oh - 1) * sh + kh - (h + 2 * ph))
        extra_w = max(0, (ow - 1) * sw + kw - (w + 2 * pw))
        fill = float("-inf") if self.max else 0.0
        xp = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=fill)
        if self.max:
            out = F.max_pool2d(xp, self.kernel, self.stride)[:, :, :oh, :ow]
            # caffe: a window entirely in the overhang keeps its initial -FLT_MAX
            return out.clamp(min=max(torch.finfo(out.dtype).min, -torch.finfo(torch.float32).max))
        if self._divisor is None or self._divisor.device != x.device:
            # caffe: pool_size = (min(hstart + k, H + pad) - hstart) * (same for w), hstart from -pad
            rows = [min(i * sh - ph + kh, h + ph) - (i * sh - ph) for i in range(oh)]
            cols = [min(j * sw - pw + kw, w + pw) - (j * sw - pw) for j in range(ow)]
            self._divisor = torch.tensor(rows, device=x.device)[:, None] * torch.tensor(cols, device=x.device)
        sums = F.avg_pool2d(xp, self.kernel, self.stride)[:, :, :oh, :ow] * (kh * kw)
        return sums / self._divisor.to(x.dtype)


@register("LRN")
class LRN(CaffeLayer):
    """caffe: lrn_layer.cpp -- ACROSS_CHANNELS or WITHIN_CHANNEL (see forward)."""

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


@register("SPP")
class SPP(CaffeLayer):
    """caffe: spp_layer.cpp -- spatial pyramid pooling: for level l < pyramid_height, a Pooling of 2^l x 2^l
    bins (kernel ceil(H / bins), stride = kernel, pad (kernel * bins - H + 1) / 2, per axis); each flattened,
    all concatenated along axis 1. pyramid_height 1 is one global pooling."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.spp_param
        _check_4d(bottom_shapes[0])
        if p.pyramid_height < 1:
            raise ValueError(f"spp_param.pyramid_height must be positive, got {p.pyramid_height}")
        h, w = bottom_shapes[0][2:]
        self.levels = nn.ModuleList()
        for level in range(p.pyramid_height):
            lp = caffe_pb2.LayerParameter(name=f"{param.name}_pool{level}", type="Pooling")
            pp = lp.pooling_param
            pp.pool = p.pool  # SPPParameter.PoolMethod has PoolingParameter's values
            if p.pyramid_height == 1:
                pp.global_pooling = True
            else:
                bins = 2**level
                kh, kw = -(-h // bins), -(-w // bins)
                pp.kernel_h, pp.kernel_w, pp.stride_h, pp.stride_w = kh, kw, kh, kw
                pp.pad_h, pp.pad_w = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
            self.levels.append(Pooling(lp, bottom_shapes))

    def top_shapes(self):
        n = self.bottom_shapes[0][0]
        return [(n, sum(math.prod(m.top_shapes()[0][1:]) for m in self.levels))]

    def forward(self, x):
        return torch.cat([m(x).flatten(1) for m in self.levels], 1)
