"""Pruning the residual channels: the channels an Eltwise sum joins, one mask for a whole ResNet stage.

In a stage (res3a..res3d) the projection shortcut (branch1), every block's branch2c and the block outputs
share one channel index: the Eltwise sums add them channel by channel, and identity shortcuts carry them
from block to block. A residual group is that set of values, found from the blob graph: the Eltwise
bottoms and tops, joined through per-channel layers (BatchNorm, Scale, ReLU, Dropout) and Pooling. Its
producers are the convs that write into it (branch1, branch2c), its consumers the convs and InnerProducts
that read from it (the next blocks' branch2a, the next stage's branch1 and branch2a, fc1000). Dropping a
channel of the group drops it from every producer's output (and its BatchNorm/Scale) and from every
consumer's input: structured pruning as dependency-graph pruners (Torch-Pruning) do it, beside the
paper's inner-only scheme (He et al., ICCV 2017, sec. 4.1 keeps these widths).

The mask keeps the channels of largest energy: sum over the group's consumers of mean(input^2) x
||consumer weights of that channel||^2, the first-order change of the consumers'
outputs when the channel is zeroed, on the sampled images of the ORIGINAL net. Consumers are not refitted
(fine-tuning recovers); pruned this way the net equals the original with those channels' Scale set to 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from resnet_imagenet.net import layers as L
from resnet_imagenet.net.graph import Value, blob_graph
from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import array_to_blob, blob_to_array, is_legacy

_PASS = ("BatchNorm", "Scale", "ReLU", "Sigmoid", "TanH", "Dropout", "Pooling", "Eltwise")


@dataclass
class ResidualGroup:
    """producers: convs writing the group's channels; consumers: convs/InnerProducts reading them;
    affine: BatchNorm/Scale layers on group values (their blobs are sliced)."""

    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    affine: list[str] = field(default_factory=list)
    channels: int = 0


def _plain(net: CaffeNet, lp: caffe_pb2.LayerParameter) -> bool:
    m = net.layers[lp.name] if lp.name in net.layers else None
    if isinstance(m, L.Convolution):
        return m.group == 1
    return isinstance(m, L.InnerProduct)


def _passes(net: CaffeNet, lp: caffe_pb2.LayerParameter) -> bool:
    """Keeps channel c as channel c: per-channel layers, Pooling, Eltwise (one top)."""
    if lp.type not in _PASS or len(lp.top) != 1:
        return False
    if lp.type == "Eltwise":
        return True
    m = net.layers[lp.name]
    return len(lp.bottom) == 1 and not (isinstance(m, L.Scale) and m.weight is not None and m.weight.dim() != 1)


def _grow(net: CaffeNet, seed: Value) -> tuple[ResidualGroup, set[Value]] | None:
    """The group of values joined with ``seed``; None when a value comes from or goes to a layer that
    cannot follow a channel mask (a net input, Concat, Flatten, a grouped conv, ...)."""
    lps, graph = net.layer_params, blob_graph(net.layer_params)
    group, seen, todo = ResidualGroup(), {seed}, [seed]
    layers: set[int] = set()
    ok = True

    def join(i: int) -> None:  # a pass-through layer: all it reads and writes carry the same channels
        layers.add(i)
        for w in [*graph.reads[i], *graph.writes[i]]:
            if w not in seen:
                seen.add(w)
                todo.append(w)

    while todo:
        v = todo.pop()
        p = graph.producer.get(v)
        if p is None:
            ok = False  # a net input or data layer: its channels are not ours to drop
        elif lps[p].type == "Convolution" and _plain(net, lps[p]):
            group.producers.append(lps[p].name)
        elif _passes(net, lps[p]):
            join(p)
        else:
            ok = False
        for r in graph.readers.get(v, []):
            if _passes(net, lps[r]):
                join(r)
            elif _plain(net, lps[r]):
                group.consumers.append(lps[r].name)
            else:
                ok = False
    if not ok or not group.producers:
        return None
    group.affine = [lps[i].name for i in sorted(layers) if lps[i].type in ("BatchNorm", "Scale")]
    for attr in ("producers", "consumers"):
        setattr(group, attr, list(dict.fromkeys(getattr(group, attr))))
    order = {lp.name: i for i, lp in enumerate(lps)}
    group.producers.sort(key=order.__getitem__)
    group.consumers.sort(key=order.__getitem__)
    group.channels = net.layers[group.producers[0]].weight.shape[0]
    return group, seen


def find_residual_groups(net: CaffeNet) -> list[ResidualGroup]:
    """The residual groups of ``net`` (one per ResNet stage) in network order."""
    graph = blob_graph(net.layer_params)
    groups, done = [], set()
    for i, lp in enumerate(net.layer_params):
        if lp.type != "Eltwise" or graph.writes[i][0] in done:
            continue
        found = _grow(net, graph.writes[i][0])
        if found is not None:
            groups.append(found[0])
            done |= found[1]
    return groups


def _consumer_w2(net: CaffeNet, group: ResidualGroup, name: str) -> torch.Tensor:
    w = net.layers[name].weight.detach().double()
    return (w.reshape(w.shape[0], group.channels, -1) ** 2).sum((0, 2)).cpu()  # InnerProduct: channel-major


def channel_energy(net: CaffeNet, groups: list[ResidualGroup], batches: Iterable[torch.Tensor]) -> list[np.ndarray]:
    """Per group and channel: sum over its consumers of mean(input^2) x ||consumer weights of it||^2,
    the inputs taken as each consumer reads them (forward pre-hooks) on ``batches`` through ``net``."""
    energy = [torch.zeros(g.channels, dtype=torch.float64) for g in groups]
    hooks = []
    for gi, g in enumerate(groups):
        for name in g.consumers:
            w2 = _consumer_w2(net, g, name)

            def hook(_m, inp, gi=gi, w2=w2, c=g.channels):
                a = inp[0].detach().double().transpose(0, 1).reshape(c, -1)
                energy[gi] += (a**2).mean(1).cpu() * len(inp[0]) * w2

            hooks.append(net.layers[name].register_forward_pre_hook(hook))
    n = 0
    try:
        with torch.no_grad():
            for x in batches:
                net(x, **{k: torch.zeros(len(x), device=x.device) for k in net.input_names[1:]})
                n += len(x)
    finally:
        for h in hooks:
            h.remove()
    return [(e / max(n, 1)).numpy() for e in energy]


def residual_keeps(
    net: CaffeNet, cuts: list[tuple[ResidualGroup, int]], batches: Iterable[torch.Tensor]
) -> list[tuple[ResidualGroup, np.ndarray]]:
    """Each group's ``k`` channels of largest energy (channel_energy), as sorted indices."""
    energy = channel_energy(net, [g for g, _ in cuts], batches)
    out = []
    for (g, k), e in zip(cuts, energy):
        keep = np.sort(np.argsort(-e, kind="stable")[:k])
        out.append((g, keep))
    return out


def _slice(blob: caffe_pb2.BlobProto, keep: np.ndarray, axis: int, channels: int) -> caffe_pb2.BlobProto:
    a = blob_to_array(blob)
    shape = a.shape
    if axis == 1 and a.ndim == 2:  # InnerProduct weights (out, C*H*W): columns are channel-major
        a = a.reshape(shape[0], channels, -1)[:, keep].reshape(shape[0], -1)
    else:
        a = np.take(a, keep, axis=axis)
    return array_to_blob(np.ascontiguousarray(a), legacy=is_legacy(blob))


def apply_residual(net: CaffeNet, cuts: list[tuple[ResidualGroup, np.ndarray]]) -> CaffeNet:
    """A copy of ``net`` with each group cut to its kept channels (sorted indices), rebuilt from its proto."""
    proto = net.to_proto(with_blobs=True)
    by_name = {lp.name: lp for lp in proto.layer}
    for group, keep in cuts:
        for name in group.producers:
            lp = by_name[name]
            lp.convolution_param.num_output = len(keep)
            for j, b in enumerate(lp.blobs):
                lp.blobs[j].CopyFrom(_slice(b, keep, 0, group.channels))
        for name in group.affine:
            lp = by_name[name]
            for j, b in enumerate(lp.blobs):
                if blob_to_array(b).size == group.channels:  # BatchNorm's scale factor blob stays
                    lp.blobs[j].CopyFrom(_slice(b, keep, 0, group.channels))
        for name in group.consumers:
            lp = by_name[name]
            lp.blobs[0].CopyFrom(_slice(lp.blobs[0], keep, 1, group.channels))
    out = CaffeNet(proto, phase=net.phase, input_shapes=net.input_shapes)
    out.copy_from(proto)
    dev = next(net.parameters()).device
    return out.to(dev).train(net.training)
