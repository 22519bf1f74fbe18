"""Pruning a ResNet block's input as branch2a sees it: caffe-pro's channel sampler (a Filter layer).

The released ResNet-50-2X (ethanhe42/channel-pruning temp/resnet-50-cp.prototxt) puts a Filter layer
in front of every branch2a (``pool1 -> pool1_Filter -> res2a_branch2a``) while the shortcut/branch1 keep
reading the whole blob. A Filter keeps the channels whose ``selector`` blob entry is non-zero, num_output
of them. This module finds the convs that can take one and writes the layers into a NetParameter: the
in-memory pruned net gets them at full width (surgery.with_full_filters), core.prune_net narrows them by
LASSO + least squares, and export_filters copies them into the exported train_val with
``param { lr_mult: 0 decay_mult: 0 }`` as the released prototxt has them.
"""

from __future__ import annotations

from resnet_imagenet.net.graph import blob_graph
from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.prune.graph import PrunePair


def filter_targets(net: CaffeNet, pairs: list[PrunePair]) -> dict[str, int]:
    """Convs whose input a Filter may prune -> that input's channels: a pair's first conv (ResNet
    branch2a) that reads a blob some other layer reads too (the block input, kept whole by the shortcut)
    and whose input is not already pruned by another pair."""
    graph = blob_graph(net.layer_params)
    index = {lp.name: i for i, lp in enumerate(net.layer_params)}
    nexts = {p.next for p in pairs}
    out = {}
    for p in pairs:
        if p.conv not in nexts and len(graph.readers[graph.reads[index[p.conv]][0]]) > 1:
            out[p.conv] = net.layers[p.conv].weight.shape[1]
    return out


def check_filters(net: CaffeNet, pairs: list[PrunePair], filters: dict[str, int]) -> None:
    """Every named conv must take a Filter (see filter_targets), with a width in 1..its input channels."""
    targets = filter_targets(net, pairs)
    for name, k in filters.items():
        if name not in targets:
            raise ValueError(
                f"layer '{name}': its input cannot be filtered (convs reading a block input: "
                f"{', '.join(targets) or 'none'})"
            )
        if not 1 <= k <= targets[name]:
            raise ValueError(f"layer '{name}': input filter width {k} outside 1..{targets[name]}")


def filter_name(net_param: caffe_pb2.NetParameter, bottom: str) -> str:
    """The released naming, ``<bottom>_Filter`` for the layer and its top; suffixed if that name is taken."""
    taken = {lp.name for lp in net_param.layer} | {t for lp in net_param.layer for t in lp.top}
    name, i = f"{bottom}_Filter", 1
    while name in taken:
        name, i = f"{bottom}_Filter{i}", i + 1
    return name


def filter_layer(name: str, bottom: str, num_output: int) -> caffe_pb2.LayerParameter:
    lp = caffe_pb2.LayerParameter(name=name, type="Filter", bottom=[bottom], top=[name])
    lp.param.add(lr_mult=0, decay_mult=0)  # as the released prototxt: the selector is not learned
    lp.filter_param.num_output = num_output
    return lp


def insert_filters(
    net_param: caffe_pb2.NetParameter, convs: dict[str, int], before: dict[str, str] | None = None
) -> dict[str, str]:
    """Put a Filter of width ``convs[conv]`` in front of each named conv of ``net_param`` (in place); the
    conv reads the Filter's top. ``before``: conv -> Filter name to use. Returns conv -> Filter name."""
    names: dict[str, str] = {}
    layers = list(net_param.layer)
    net_param.ClearField("layer")
    for lp in layers:
        if lp.name in convs:
            name = (before or {}).get(lp.name) or filter_name(net_param, lp.bottom[0])
            net_param.layer.append(filter_layer(name, lp.bottom[0], convs[lp.name]))
            lp.bottom[0] = name
            names[lp.name] = name
        net_param.layer.append(lp)
    return names


def export_filters(tv: caffe_pb2.NetParameter, pruned: CaffeNet) -> None:
    """Copy the pruned net's Filter layers (name, width) in front of the same convs of ``tv`` (in place)."""
    graph = blob_graph(pruned.layer_params)
    convs, names = {}, {}
    have = {lp.name for lp in tv.layer}
    for i, lp in enumerate(pruned.layer_params):
        if lp.type == "Filter" and lp.name not in have:
            for k in graph.consumers(i):
                reader = pruned.layer_params[k].name
                convs[reader], names[reader] = lp.filter_param.num_output, lp.name
    if convs:
        insert_filters(tv, convs, names)
