"""Where a net can be pruned: the prunable conv pairs and the residual sums, found from its blob graph.

A prunable pair is a convolution A whose output reaches exactly one convolution B through
per-channel layers only (BatchNorm, Scale, ReLU, ...): removing A's output channel c removes B's
input channel c and nothing else. In ResNet bottlenecks these are branch2a->branch2b and
branch2b->branch2c; branch2c, branch1 and conv1 feed an Eltwise or a Pooling and keep their widths.
Pairs are found from net/graph.py's blob graph (bottoms/tops, in-place layers included), not from names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from resnet_imagenet.net import layers as L
from resnet_imagenet.net.graph import blob_graph
from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2

# Layers that act on each channel separately: A's channels can be dropped through them.
CHANNELWISE = ("BatchNorm", "Scale", "ReLU", "Sigmoid", "TanH", "Dropout")


@dataclass
class PrunePair:
    """conv: the layer whose outputs are pruned; next: the conv reading them; chain: layers between."""

    conv: str
    next: str
    chain: list[str]
    channels: int


def _is_plain_conv(m: nn.Module) -> bool:
    return isinstance(m, L.Convolution) and m.group == 1


def _per_channel(net: CaffeNet, lp: caffe_pb2.LayerParameter) -> bool:
    mod = net.layers[lp.name]
    return len(lp.bottom) == 1 and len(lp.top) == 1 and not (isinstance(mod, L.Scale) and mod.weight.dim() != 1)


def find_pairs(net: CaffeNet) -> list[PrunePair]:
    """The prunable (conv, next conv) pairs of ``net`` in network order, found from its blob graph."""
    graph = blob_graph(net.layer_params)
    lps = net.layer_params
    pairs = []
    for i, lp in enumerate(lps):
        if not _is_plain_conv(net.layers[lp.name]) or len(lp.top) != 1:
            continue
        chain, j = [], i
        while True:
            nxt = graph.consumers(j)
            if len(nxt) != 1:
                break
            j = nxt[0]
            cl = lps[j]
            if len(cl.bottom) != 1 or len(cl.top) != 1:
                break
            if _is_plain_conv(net.layers[cl.name]):
                pairs.append(PrunePair(lp.name, cl.name, chain, net.layers[lp.name].weight.shape[0]))
                break
            if cl.type not in CHANNELWISE or not _per_channel(net, cl):
                break
            chain.append(cl.name)
    return pairs


@dataclass
class ResidualSum:
    """conv's output reaches bottom ``main`` of the Eltwise SUM ``eltwise`` through the per-channel
    affine layers ``affine`` (BatchNorm, Scale): y_sum = scale * conv + shift + the other bottoms."""

    eltwise: str
    main: int
    affine: list[str]


def find_residual_sum(net: CaffeNet, conv: str) -> ResidualSum | None:
    """How ``conv`` (a ResNet branch2c) feeds a residual sum, or None when it does not."""
    graph = blob_graph(net.layer_params)
    lps = net.layer_params
    j = next(i for i, lp in enumerate(lps) if lp.name == conv)
    affine: list[str] = []
    while True:
        nxt = graph.consumers(j)
        if len(nxt) != 1:
            return None
        top, j = lps[j].top[0], nxt[0]
        cl = lps[j]
        if cl.type == "Eltwise":
            mod = net.layers[cl.name]
            if mod.op != caffe_pb2.EltwiseParameter.SUM or list(cl.bottom).count(top) != 1:
                return None
            main = list(cl.bottom).index(top)
            return ResidualSum(cl.name, main, affine) if mod.coeff[main] != 0 else None
        if cl.type not in ("BatchNorm", "Scale") or not _per_channel(net, cl):
            return None
        affine.append(cl.name)


def residual_affine(net: CaffeNet, res: ResidualSum, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel with Eltwise output = scale * conv output + shift + other bottoms."""
    dev = next(net.parameters()).device
    v = torch.tensor([0.0, 1.0], device=dev).view(2, 1, 1, 1).expand(2, channels, 1, 1).contiguous()
    with torch.no_grad():  # the affine layers in TEST mode (BatchNorm: global statistics) are exact on 0 and 1
        for name in res.affine:
            v = net.layers[name](v)
    c = net.layers[res.eltwise].coeff[res.main]
    v = v.flatten(1).double().cpu() * c
    return v[1] - v[0], v[0]
