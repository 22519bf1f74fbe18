"""The layer registry: Caffe type string -> torch module with Caffe's semantics.

Each layer is built from its LayerParameter and the shapes of its bottoms (Caffe's
LayerSetUp + Reshape), knows its top shapes by Caffe's formulas, and exposes its parameter
blobs in Caffe's order (``blob_names``) so .caffemodel files map one to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import DATA_LAYER_TYPES, PrototxtError

Shape = tuple[int, ...]
LAYERS: dict[str, type[CaffeLayer]] = {}


def register(*type_names: str) -> Callable[[type[CaffeLayer]], type[CaffeLayer]]:
    """Class decorator adding a layer under Caffe's type string(s); a duplicate is an error."""

    def deco(cls: type[CaffeLayer]) -> type[CaffeLayer]:
        for name in type_names:
            if name in LAYERS:
                raise KeyError(f"layer type {name!r} registered twice ({LAYERS[name].__name__}, {cls.__name__})")
            LAYERS[name] = cls
        return cls

    return deco


def build_layer(param: caffe_pb2.LayerParameter, bottom_shapes: Sequence[Shape]) -> CaffeLayer:
    """Build the module for one (non-data) layer; errors name the layer."""
    if param.type == "Python":
        raise PrototxtError(
            f"layer '{param.name}': the Python layer runs arbitrary code from the prototxt and is refused"
        )
    cls = LAYERS.get(param.type)
    if cls is None:
        known = ", ".join(sorted(set(LAYERS) | set(DATA_LAYER_TYPES)))
        raise PrototxtError(f"layer '{param.name}': Unknown layer type: {param.type} (known types: {known})")
    try:
        return cls(param, [tuple(s) for s in bottom_shapes])
    except (ValueError, IndexError, ZeroDivisionError) as e:
        raise PrototxtError(f"layer '{param.name}' ({param.type}): {e}") from None


class CaffeLayer(nn.Module):
    """Base: ``blob_names`` lists the attributes holding Caffe's blobs, in Caffe's order."""

    blob_names: tuple[str, ...] = ()
    n_bottoms: tuple[int, int] = (1, 1)  # (min, max) bottoms

    def __init__(self, param: caffe_pb2.LayerParameter, bottom_shapes: list[Shape]) -> None:
        super().__init__()
        lo, hi = self.n_bottoms
        if not lo <= len(bottom_shapes) <= hi:
            raise ValueError(f"takes {lo}..{hi} bottoms, got {len(bottom_shapes)}")
        self.name = param.name
        self.bottom_shapes = bottom_shapes

    def top_shapes(self) -> list[Shape]:
        return [self.bottom_shapes[0]]

    def blobs(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.blob_names if getattr(self, n) is not None]

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def fill_(t: torch.Tensor, filler: caffe_pb2.FillerParameter | None, default: float = 0.0) -> None:
    """Initialize ``t`` with Caffe's filler (caffe: include/caffe/filler.hpp)."""
    with torch.no_grad():
        if filler is None:
            t.fill_(default)
            return
        kind = filler.type
        fan_in = t.numel() // t.shape[0] if t.dim() else 1
        fan_out = t.numel() // t.shape[1] if t.dim() > 1 else t.numel()
        n = {0: fan_in, 1: fan_out, 2: (fan_in + fan_out) / 2}[filler.variance_norm]
        if kind == "constant":
            t.fill_(filler.value)
        elif kind == "gaussian":
            t.normal_(filler.mean, filler.std)
        elif kind == "uniform":
            t.uniform_(filler.min, filler.max)
        elif kind == "xavier":
            scale = math.sqrt(3.0 / n)
            t.uniform_(-scale, scale)
        elif kind == "msra":
            t.normal_(0.0, math.sqrt(2.0 / n))
        else:
            raise ValueError(f"unsupported filler type {kind!r} (constant, gaussian, uniform, xavier, msra)")


def _filler(p, field: str) -> caffe_pb2.FillerParameter | None:
    return getattr(p, field) if p.HasField(field) else None


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


@register("Convolution")
class Convolution(CaffeLayer):
    blob_names = ("weight", "bias")

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.convolution_param
        _check_4d(bottom_shapes[0])
        if p.axis != 1:
            raise ValueError("only axis 1 (channels) is supported")
        # caffe: base_conv_layer.cpp -- kernel_h/_w and stride_h/_w replace kernel_size/stride and
        # must both be positive; pad_h or pad_w alone is fine (the other stays 0)
        has = {f: p.HasField(f"{f}_h") or p.HasField(f"{f}_w") for f in ("kernel", "stride")}
        self.kernel = _pair(p.kernel_size, has["kernel"], p.kernel_h, p.kernel_w, None, "kernel_size")
        self.stride = _pair(p.stride, has["stride"], p.stride_h, p.stride_w, 1, "stride")
        self.pad = _pair(p.pad, p.HasField("pad_h") or p.HasField("pad_w"), p.pad_h, p.pad_w, 0, "pad")
        if min(self.kernel) <= 0 or min(self.stride) <= 0:
            raise ValueError(f"kernel {self.kernel} and stride {self.stride} must be positive")
        self.dilation = _pair(p.dilation, False, 0, 0, 1, "dilation")
        self.group = p.group
        cin, cout = bottom_shapes[0][1], p.num_output
        if cout <= 0 or cin % self.group or cout % self.group:
            raise ValueError(
                f"num_output {cout} and {cin} input channels must be positive multiples of group {p.group}"
            )
        self.weight = nn.Parameter(torch.empty(cout, cin // self.group, *self.kernel))
        fill_(self.weight, _filler(p, "weight_filler"))
        self.bias = None
        if p.bias_term:
            self.bias = nn.Parameter(torch.empty(cout))
            fill_(self.bias, _filler(p, "bias_filler"))

    def top_shapes(self):
        n, _, h, w = self.bottom_shapes[0]
        # caffe: conv_layer.cpp compute_output_shape -- (in + 2p - dilated kernel) / s + 1, rounded down
        hw = [
            (size + 2 * p - (d * (k - 1) + 1)) // s + 1
            for size, p, k, s, d in zip((h, w), self.pad, self.kernel, self.stride, self.dilation)
        ]
        return [(n, self.weight.shape[0], *hw)]

    def macs(self) -> int:
        return math.prod(self.top_shapes()[0][1:]) * math.prod(self.weight.shape[1:])

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.pad, self.dilation, self.group)


@register("Pooling")
class Pooling(CaffeLayer):
    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.pooling_param
        _check_4d(bottom_shapes[0])
        if p.pool == caffe_pb2.PoolingParameter.STOCHASTIC:
            raise ValueError("STOCHASTIC pooling is not supported")
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
            self.kernel = _pair(
                [p.kernel_size] if p.HasField("kernel_size") else [],
                p.HasField("kernel_h"), p.kernel_h, p.kernel_w, None, "kernel_size",
            )  # fmt: skip
        self.stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
        self.pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
        if min(self.kernel) <= 0 or min(self.stride) <= 0:
            raise ValueError(f"kernel {self.kernel} and stride {self.stride} must be positive")
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
            fill_(self.weight, _filler(p, "filler"), default=1.0)
        if shape[self.axis : self.axis + len(pshape)] != tuple(pshape):
            raise ValueError(f"scale shape {pshape} does not match input {shape} at axis {self.axis}")
        self.view = tuple(pshape) + (1,) * (len(shape) - self.axis - len(pshape))
        self.bias = None
        if p.bias_term:
            self.bias = nn.Parameter(torch.empty(pshape))
            fill_(self.bias, _filler(p, "bias_filler"), default=0.0)

    def forward(self, x, scale=None):
        s = (self.weight if scale is None else scale).reshape(self.view)
        if self.bias is None:
            return x * s
        return torch.addcmul(self.bias.reshape(self.view), x, s)


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
        fill_(self.weight, _filler(p, "weight_filler"))
        self.bias = None
        if p.bias_term:
            self.bias = nn.Parameter(torch.empty(p.num_output))
            fill_(self.bias, _filler(p, "bias_filler"))
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
