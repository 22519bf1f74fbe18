"""The layer registry and what every layer family shares (BVLC Caffe's layer.hpp, layer_factory.hpp, filler.hpp).

A layer type is a Caffe type string mapped to a torch module with Caffe's semantics. Each layer is built
from its LayerParameter and the shapes of its bottoms (Caffe's LayerSetUp + Reshape), knows its top shapes
by Caffe's formulas, and exposes its parameter blobs in Caffe's order (``blob_names``) so .caffemodel files
map one to one. The families (vision, neuron, common, loss) register their types when the package is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
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


def filler_of(p, field: str) -> caffe_pb2.FillerParameter | None:
    """The FillerParameter ``field`` of a layer's parameter message, or None when it is not set."""
    return getattr(p, field) if p.HasField(field) else None
