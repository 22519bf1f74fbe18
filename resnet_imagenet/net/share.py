"""Blobs shared between layers by ``param { name: "..." }`` (Caffe's siamese nets).

caffe: src/caffe/net.cpp AppendParam -- the first layer naming a param owns its blob; a later layer giving
the same name uses the owner's blob (ShareData + ShareDiff), so the owner's diff sums every sharer's gradient
and the solver updates it once. The shapes must be equal (share_mode STRICT, the default) or, with
PERMISSIVE, have the same count. A sharer's lr_mult / decay_mult must equal the owner's where both are given;
one given by a sharer only becomes the blob's. Here a sharer's module holds the owner's very torch tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from resnet_imagenet.net.layers import CaffeLayer
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError

log = logging.getLogger(__name__)


@dataclass
class _Owned:
    """A named blob: the layer and blob index that own it, and its multipliers where some layer gives them."""

    layer: str
    index: int
    blob: torch.Tensor
    lr_mult: float | None = None
    decay_mult: float | None = None


def present_blobs(module: CaffeLayer) -> list[str]:
    """The attributes of ``module``'s blobs that it has (caffe: blobs_ holds only those), in Caffe's order."""
    return [a for a in module.blob_names if getattr(module, a, None) is not None]


class ParamSharing:
    """The named params of one net, fed layer by layer in net order (``add``)."""

    def __init__(self) -> None:
        self.named: dict[str, _Owned] = {}
        self.name_of: dict[tuple[str, int], str] = {}  # (layer, blob index) -> param name

    def add(self, lp: caffe_pb2.LayerParameter, module: CaffeLayer) -> None:
        """Record the params ``lp`` owns; make the ones it shares use their owner's tensor."""
        for i, attr in enumerate(present_blobs(module)):
            spec = lp.param[i] if i < len(lp.param) else None
            if spec is None or not spec.name:
                continue
            self.name_of[(lp.name, i)] = spec.name
            owned = self.named.get(spec.name)
            if owned is None:
                self.named[spec.name] = _Owned(lp.name, i, getattr(module, attr))
            else:
                self._share(lp, module, i, attr, spec, owned)
            self._merge_mults(lp, spec, self.named[spec.name])

    def _share(
        self, lp: caffe_pb2.LayerParameter, module: CaffeLayer, i: int, attr: str, spec: caffe_pb2.ParamSpec, owned
    ) -> None:
        mine, theirs = getattr(module, attr), owned.blob
        where = f"layer '{lp.name}': cannot share param '{spec.name}' owned by layer '{owned.layer}'"
        if tuple(mine.shape) != tuple(theirs.shape):
            if spec.share_mode != caffe_pb2.ParamSpec.PERMISSIVE or mine.numel() != theirs.numel():
                what = "count" if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE else "shape"
                raise PrototxtError(
                    f"{where}: {what} mismatch (owner blob {owned.index} has shape {tuple(theirs.shape)}, "
                    f"this layer's blob {i} {tuple(mine.shape)})"
                )
            raise PrototxtError(
                f"{where}: share_mode PERMISSIVE between the shapes {tuple(theirs.shape)} and {tuple(mine.shape)} "
                "(same count, another shape) is not supported; give both layers the same shape"
            )
        if attr in module._parameters:
            if not isinstance(theirs, nn.Parameter):
                raise PrototxtError(f"{where}: the owner's blob is not learnable here, this layer's is")
            module._parameters[attr] = theirs
        else:
            if isinstance(theirs, nn.Parameter):
                raise PrototxtError(f"{where}: the owner's blob is learnable here, this layer's is not")
            module._buffers[attr] = theirs
        log.info("Sharing parameters '%s' owned by layer '%s', param index %d", spec.name, owned.layer, owned.index)

    @staticmethod
    def _merge_mults(lp: caffe_pb2.LayerParameter, spec: caffe_pb2.ParamSpec, owned: _Owned) -> None:
        # caffe: AppendParam -- CHECK_EQ on mismatched lr_mult / decay_mult; a first given one is adopted
        for field in ("lr_mult", "decay_mult"):
            if not spec.HasField(field):
                continue
            have, given = getattr(owned, field), getattr(spec, field)
            if have is None:
                setattr(owned, field, given)
            elif have != given:
                raise PrototxtError(
                    f"layer '{lp.name}': shared param '{spec.name}' has mismatched {field} "
                    f"({given:g}; owner layer '{owned.layer}' and the layers before say {have:g})"
                )

    def multipliers(self, layer: str, i: int, spec: caffe_pb2.ParamSpec) -> tuple[float, float]:
        """(lr_mult, decay_mult) of blob ``i`` of ``layer``: a named blob's as merged over its layers (default 1)."""
        name = self.name_of.get((layer, i))
        if name is None:
            return spec.lr_mult, spec.decay_mult
        owned = self.named[name]
        lr = owned.lr_mult if owned.lr_mult is not None else 1.0
        decay = owned.decay_mult if owned.decay_mult is not None else 1.0
        return lr, decay

    def is_sharer(self, layer: str, i: int) -> bool:
        """Whether blob ``i`` of ``layer`` is another layer's (not owned by ``layer``)."""
        name = self.name_of.get((layer, i))
        return name is not None and (self.named[name].layer, self.named[name].index) != (layer, i)
