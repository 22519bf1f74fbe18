"""What a net costs: learnable parameters and multiply-accumulates (MACs), per layer and in total.

MACs count the multiply-accumulates of Convolution (output elements x Cin/group x kh x kw) and
InnerProduct (outputs x inputs) layers, the usual ResNet "FLOPs" figure; other layers count 0.
The one counter behind ``summary``, ``prune --speedup`` and the pruning report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from resnet_imagenet.net.layers.data import data_layer_shapes
from resnet_imagenet.net.net import CaffeNet, load_net
from resnet_imagenet.net.phase import filter_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import DATA_LAYER_TYPES, parse_phase, read_net


@dataclass
class LayerCost:
    name: str
    type: str
    top_shapes: list[tuple[int, ...]]
    params: int = 0
    macs: int = 0


@dataclass
class Summary:
    name: str
    batch: int
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(x.params for x in self.layers)

    @property
    def macs(self) -> int:
        return sum(x.macs for x in self.layers)

    def layer(self, name: str) -> LayerCost:
        return next(x for x in self.layers if x.name == name)


def load_at_batch(
    model_path: str | os.PathLike, phase: str | int, batch: int | None, input_shapes: dict | None = None
) -> CaffeNet:
    """The net for ``phase`` with every data layer's batch dimension set to ``batch`` (None: as written);
    ``input_shapes`` (by top) are the data layers' shapes where known (data/shapes.py reads them from records)."""
    ph = parse_phase(phase)
    net_param = filter_net(read_net(model_path), ph)
    shapes = dict(input_shapes or {})
    if batch is not None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        for lp in net_param.layer:
            if lp.type in DATA_LAYER_TYPES:
                known = [shapes[t] for t in lp.top] if all(t in shapes for t in lp.top) else data_layer_shapes(lp)
                for top, shape in zip(lp.top, known):
                    shapes[top] = (batch, *shape[1:])
    return load_net(net_param, phase=ph, input_shapes=shapes or None)


def _params(module: torch.nn.Module) -> int:
    """Learnable parameters of one layer (BatchNorm's statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters())


def _macs(module: torch.nn.Module) -> int:
    """Per image: Convolution's out elements x Cin/g x kh x kw, InnerProduct's outputs x inputs (the layers'
    own macs()); 0 for every other layer."""
    return module.macs() if hasattr(module, "macs") else 0


def summarize(
    model_path: str | os.PathLike, phase: str | int = "test", batch: int = 1, input_shapes: dict | None = None
) -> Summary:
    """Per-layer top shapes, learnable parameters (BatchNorm statistics excluded) and MACs of a net;
    ``input_shapes``: data layers' top shapes where known (data/shapes.py)."""
    net = load_at_batch(model_path, phase, batch, input_shapes)
    out = Summary(net.name, batch)
    for lp in net.data_layers:
        out.layers.append(LayerCost(lp.name, lp.type, [net.input_shapes[t] for t in lp.top]))
    for lp in net.layer_params:
        module = net.layers[lp.name]
        tops = [tuple(s) for s in module.top_shapes()]
        macs = _macs(module) * tops[0][0] if hasattr(module, "macs") else 0  # per image x the top's batch axis
        out.layers.append(LayerCost(lp.name, lp.type, tops, _params(module), macs))
    return out


def count_params_macs(net: CaffeNet) -> tuple[int, int]:
    """Learnable parameters and per-image multiply-adds (conv: out elems x Cin/g x kh x kw; fc: in x out)."""
    layers = list(net.layers.values())
    return sum(_params(m) for m in layers), sum(_macs(m) for m in layers)


# -- what a net needs, before anything is allocated ----------------------------------------------

GB = 1 << 30


@dataclass
class Footprint:
    """Parameters and blob elements of a net built on the meta device (nothing allocated)."""

    name: str
    params: int
    blob_elems: int
    biggest: tuple[str, int]  # (layer, parameters) of the layer with most parameters

    @property
    def bytes(self) -> int:
        """What Caffe would hold in fp32: each parameter's data, diff and two solver history slots (Adam's),
        each blob's data and diff (caffe: Blob keeps data_ and diff_; the solver's history_ per parameter)."""
        return 4 * (4 * self.params + 2 * self.blob_elems)


def footprint(net_param: caffe_pb2.NetParameter, phase: int, input_shapes: dict | None = None) -> Footprint:
    """The net's parameter count and blob sizes from its shapes alone (layers built on torch's meta device);
    ``input_shapes``: data tops whose shape comes from the first record (data/shapes.py)."""
    with torch.device("meta"):
        net = CaffeNet(net_param, phase, input_shapes)
    per_layer = [(name, _params(m)) for name, m in net.layers.items()]
    biggest = max(per_layer, key=lambda x: x[1], default=("", 0))
    elems = sum(math.prod(s) for s in net.blob_shapes.values())
    return Footprint(net.name, sum(n for _, n in per_layer), elems, biggest)


def machine_memory(gpu: int | None) -> int:
    """Total memory of CUDA device ``gpu`` (None: this machine's physical RAM), in bytes."""
    if gpu is not None:
        return torch.cuda.get_device_properties(gpu).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_footprint(
    net_param: caffe_pb2.NetParameter, phase: int, limit: int, where: str, input_shapes: dict | None = None
) -> Footprint:
    """ValueError in one line when the net would need more than ``limit`` bytes (0: no limit)."""
    fp = footprint(net_param, phase, input_shapes)
    if limit and fp.bytes > limit:
        layer, n = fp.biggest
        raise ValueError(
            f"net '{fp.name}' needs about {fp.bytes / GB:.3g} GB ({fp.params:.3g} parameters, "
            f"{fp.blob_elems:.3g} blob elements; the largest layer '{layer}' has {n:.3g} parameters), more than "
            f"the {limit / GB:.3g} GB of {where}: shrink it, or raise the limit with --max-memory GB (0: no check)"
        )
    return fp
