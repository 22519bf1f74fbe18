"""Folding for deployment: BatchNorm + Scale into the convolution before them, Dropout out, and the input
transform (mean subtraction, scale) into the first convolution.

All folds are computed in float64 and are exact up to float32 rounding:

* BatchNorm (global statistics; caffe: batch_norm_layer.cpp -- mean and variance are the stored sums divided
  by the scale factor, y = (x - mean) / sqrt(var + eps)) and a per-channel Scale (y = x * gamma + beta) that
  read a convolution's (or InnerProduct's) output, and nothing else reads it, become that layer's weights
  W * a and bias (b - mean) * a + beta, a = gamma / sqrt(var + eps).
* Dropout is the identity at test time (caffe: dropout_layer.cpp scales at train time only): an in-place one
  is dropped, another renames its producer's top where nothing else reads that value (else it stays: a no-op).
* The input transform x = (pixels - mean) * scale (caffe: data_transformer.cpp) folded into the first
  convolution: weights W * scale, and the mean's contribution -scale * conv(mean image; W, zero padding) as a
  constant per-position offset on that convolution's output. The offset is exact for any mean: per channel
  (mean_value), crop-sized or image-sized per pixel (mean_file; an image-sized mean is center-cropped, as
  Caffe's TEST transform does) -- including the borders a padded convolution sees, where a per-channel bias
  alone would be wrong (zero padding of the raw pixels is not zero padding of the mean-subtracted input). For
  a per-channel mean and an unpadded convolution the offset is constant per channel and goes into the bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resnet_imagenet.net.graph import blob_graph
from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import TEST

_WEIGHTED = ("Convolution", "InnerProduct")


def _affine(net: CaffeNet, lp: caffe_pb2.LayerParameter) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) in float64 with layer ``lp`` (BatchNorm or per-channel Scale) computing y = x * a + c per channel."""
    m = net.layers[lp.name]
    if lp.type == "BatchNorm":
        if not m.global_stats():
            raise ValueError(f"layer '{lp.name}': BatchNorm uses batch statistics (use_global_stats: false)")
        sf = float(m.scale_factor[0])
        inv = 0.0 if sf == 0 else 1.0 / sf  # caffe: a zero scale factor means zero statistics
        a = 1.0 / torch.sqrt(m.variance.double() * inv + m.eps)
        return a, -m.mean.double() * inv * a
    bias = m.bias.double() if m.bias is not None else torch.zeros_like(m.weight, dtype=torch.float64)
    return m.weight.double(), bias


def _per_channel(net: CaffeNet, lp: caffe_pb2.LayerParameter, channels: int) -> bool:
    if lp.type == "BatchNorm":
        return True
    m = net.layers[lp.name]
    return lp.type == "Scale" and len(lp.bottom) == 1 and m.axis == 1 and tuple(m.weight.shape) == (channels,)


def _plan(net: CaffeNet) -> tuple[dict[str, list[caffe_pb2.LayerParameter]], set[str], dict[str, str]]:
    """(weighted layer -> the BatchNorm/Scale layers folded into it, layers to drop, layer -> its new top)."""
    lps = net.layer_params
    g = blob_graph(lps)
    chains: dict[str, list[caffe_pb2.LayerParameter]] = {}
    drop: set[str] = set()
    new_top: dict[str, str] = {}
    owner: dict[int, int] = {}  # index of a BatchNorm/Scale folded -> index of its weighted layer
    for k, lp in enumerate(lps):
        if lp.type not in ("BatchNorm", "Scale") or len(lp.bottom) != 1:
            continue
        value = g.reads[k][0]
        j = g.producer.get(value)
        if j is None or g.readers[value] != [k]:
            continue
        head = owner.get(j, j if lps[j].type in _WEIGHTED else None)
        if head is None or not _per_channel(net, lp, net.blob_shapes[lp.bottom[0]][1]):
            continue
        if lps[head].type == "InnerProduct" and net.layers[lps[head].name].transpose:
            continue
        chains.setdefault(lps[head].name, []).append(lp)
        owner[k] = head
        drop.add(lp.name)
        new_top[lps[head].name] = lp.top[0]
    for k, lp in enumerate(lps):
        if lp.type != "Dropout":
            continue
        value = g.reads[k][0]
        j = g.producer.get(value)
        if lp.top[0] == lp.bottom[0]:
            drop.add(lp.name)
        elif j is not None and g.readers[value] == [k] and len(lps[j].top) == 1:
            drop.add(lp.name)
            new_top[lps[owner.get(j, j)].name] = lp.top[0]
    return chains, drop, new_top


def fold_net(net: CaffeNet) -> CaffeNet:
    """A new TEST-phase CaffeNet computing what ``net`` computes at test time, without foldable BatchNorm,
    Scale and Dropout layers (see the module docstring); ``net`` is left unchanged."""
    chains, drop, new_top = _plan(net)
    proto = net.to_proto(with_blobs=False)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(proto)
    del out.layer[:]
    for lp in proto.layer:
        if lp.name in drop:
            continue
        new = out.layer.add()
        new.CopyFrom(lp)
        if lp.name in chains:
            p = new.convolution_param if lp.type == "Convolution" else new.inner_product_param
            p.bias_term = True
        if lp.name in new_top:
            new.top[0] = new_top[lp.name]
    folded = CaffeNet(out, TEST, input_shapes=net.input_shapes)
    with torch.no_grad():
        for name, module in folded.layers.items():
            src = net.layers[name]
            for dst, s in zip(module.blobs(), src.blobs()):
                if dst.shape == s.shape:
                    dst.copy_(s)
            if name in chains:
                _fold_chain(net, module, src, chains[name])
    folded.eval()
    return folded


def _fold_chain(net: CaffeNet, dst: nn.Module, src: nn.Module, chain: list[caffe_pb2.LayerParameter]) -> None:
    w = src.weight.double()
    b = src.bias.double() if src.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    for lp in chain:
        a, c = _affine(net, lp)
        w = w * a.reshape(-1, *([1] * (w.dim() - 1)))
        b = b * a + c
    dst.weight.copy_(w.float())
    dst.bias.copy_(b.float())


class OffsetConvolution(nn.Module):
    """A convolution followed by a constant per-position offset (the folded mean; see the module docstring)."""

    def __init__(self, conv: nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("offset", offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.offset


def _crop_mean(mean: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """The mean as (C, H, W): per channel broadcast, or a per-pixel mean center-cropped to H x W."""
    mean = mean.double().reshape(-1, *mean.shape[-2:]) if mean.dim() >= 3 else mean.double().reshape(-1, 1, 1)
    if mean.shape[0] != c:
        raise ValueError(f"the mean has {mean.shape[0]} channels, the net's input {c}")
    if mean.shape[1:] == (1, 1):
        return mean.expand(c, h, w)
    mh, mw = mean.shape[1:]
    if mh < h or mw < w:
        raise ValueError(f"the mean is {mh}x{mw}, smaller than the net's {h}x{w} input")
    top, left = (mh - h) // 2, (mw - w) // 2  # caffe: data_transformer.cpp -- TEST crops the center
    return mean[:, top : top + h, left : left + w]


def fold_input(net: CaffeNet, mean: torch.Tensor | None = None, scale: float = 1.0) -> str:
    """Fold x = (pixels - mean) * scale into the convolution reading the net's first input, in place, so
    ``net`` takes raw pixels; ``mean`` is per channel (C,) or per pixel (C, H, W). Returns that layer's name."""
    name = net.input_names[0]
    g = blob_graph(net.layer_params)
    readers = g.readers.get((name, 0), [])
    first = net.layer_params[readers[0]] if len(readers) == 1 else None
    if first is None or first.type != "Convolution":
        raise ValueError(f"input '{name}' is not read by exactly one Convolution: cannot fold the mean into it")
    conv = net.layers[first.name]
    _, c, h, w = net.input_shapes[name]
    with torch.no_grad():
        w64 = conv.weight.double()
        offset = None
        if mean is not None:
            m = _crop_mean(mean, c, h, w)[None]
            offset = -scale * F.conv2d(m, w64, None, conv.stride, conv.pad, conv.dilation, conv.group)[0]
        conv.weight.copy_((w64 * scale).float())
        if offset is None:
            return first.name
        flat = offset.reshape(offset.shape[0], -1)
        if (flat == flat[:, :1]).all():  # constant per channel: into the bias
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(offset.shape[0]))
            conv.bias.add_(flat[:, 0].float())
        else:
            net.layers[first.name] = OffsetConvolution(conv, offset.float())
    return first.name
