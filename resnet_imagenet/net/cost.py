"""What a net costs: learnable parameters and multiply-accumulates (MACs), per layer and in total.

MACs count the multiply-accumulates of Convolution (output elements x Cin/group x kh x kw) and
InnerProduct (outputs x inputs) layers, the usual ResNet "FLOPs" figure; other layers count 0.
The one counter behind ``summary``, ``prune --speedup`` and the pruning report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from resnet_imagenet.net.net import CaffeNet, data_layer_shapes, load_net
from resnet_imagenet.net.phase import filter_net
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
