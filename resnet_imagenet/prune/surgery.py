"""Applying a pruning to the in-memory net: narrowing layers' weights, statistics and recorded shapes.

apply_pair cuts a pair's conv (and the BatchNorm/Scale after it) to the kept channels and gives the
next conv its refitted weights; with_full_filters/apply_filter put caffe-pro Filter layers in front of
convs and narrow them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from resnet_imagenet.net import layers as L
from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.prune.filter import insert_filters
from resnet_imagenet.prune.graph import PrunePair


def apply_pair(net: CaffeNet, pair: PrunePair, keep: np.ndarray, w_next: torch.Tensor, b_next) -> None:
    """Keep channels ``keep`` of pair.conv (and its BatchNorm/Scale); give pair.next new weights."""
    idx = torch.from_numpy(keep).long()
    a = net.layers[pair.conv]
    dev = a.weight.device
    idx = idx.to(dev)
    a.weight = nn.Parameter(a.weight.data[idx].clone())
    if a.bias is not None:
        a.bias = nn.Parameter(a.bias.data[idx].clone())
    for name in pair.chain:
        m = net.layers[name]
        if isinstance(m, L.BatchNorm):
            m.mean, m.variance = m.mean[idx].clone(), m.variance[idx].clone()
        elif isinstance(m, L.Scale):
            m.weight = nn.Parameter(m.weight.data[idx].clone())
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.data[idx].clone())
            m.view = (len(keep),) + m.view[1:]
        m.bottom_shapes = [_with_channels(m.bottom_shapes[0], len(keep))]
    b = net.layers[pair.next]
    b.weight = nn.Parameter(w_next.reshape(w_next.shape[0], len(keep), *b.kernel).to(dev).contiguous())
    if b_next is not None:
        b.bias = nn.Parameter(b_next.to(dev))
    b.bottom_shapes = [_with_channels(b.bottom_shapes[0], len(keep))]
    net.layer_params_by_name(pair.conv).convolution_param.num_output = len(keep)
    for name in [pair.conv, *pair.chain]:
        for t in net.layer_params_by_name(name).top:
            net.blob_shapes[t] = _with_channels(net.blob_shapes[t], len(keep))


def _with_channels(shape: tuple[int, ...], c: int) -> tuple[int, ...]:
    return (shape[0], c, *shape[2:])


def with_full_filters(net: CaffeNet, convs: list[str]) -> tuple[CaffeNet, dict[str, str]]:
    """A copy of ``net`` (weights included) with a full-width (identity) Filter in front of each conv."""
    proto = net.to_proto(with_blobs=True)
    names = insert_filters(proto, {c: net.layers[c].weight.shape[1] for c in convs})
    out = CaffeNet(proto, phase=net.phase, input_shapes=net.input_shapes)
    out.copy_from(proto)
    dev = next(net.parameters()).device
    return out.to(dev).train(net.training), names


def apply_filter(net: CaffeNet, name: str, conv: str, keep: np.ndarray, w: torch.Tensor, b) -> None:
    """Narrow Filter ``name`` to the channels ``keep`` and give ``conv`` (reading it) the weights ``w``, ``b``."""
    f, c = net.layers[name], net.layers[conv]
    dev = c.weight.device
    sel = torch.zeros_like(f.selector)
    sel[torch.from_numpy(keep).long().to(sel.device)] = 1.0
    f.selector, f.num_output = sel, len(keep)
    net.layer_params_by_name(name).filter_param.num_output = len(keep)
    shape = f.top_shapes()[0]
    net.blob_shapes[name] = shape
    c.weight = nn.Parameter(w.reshape(w.shape[0], len(keep), *c.kernel).to(dev).contiguous())
    if b is not None:
        c.bias = nn.Parameter(b.to(dev))
    c.bottom_shapes = [shape]
