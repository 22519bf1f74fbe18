"""A net's weights as Caffe stores them: the blobs of each layer in a .caffemodel (a binary NetParameter).

caffe: Net::CopyTrainedLayersFrom (layers matched by name, source layers the net lacks ignored) and the
blobs Net::ToProto writes. A blob read in the legacy 4-D num/channels/height/width form is written back
the same way, so a loaded file saves byte for byte.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from resnet_imagenet.net.layers import CaffeLayer
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import array_to_blob, blob_shape, blob_to_array, is_legacy, read_binary_proto
from resnet_imagenet.proto.text import upgrade_net

log = logging.getLogger(__name__)

Legacy = set[tuple[str, int]]  # (layer name, blob index) of the blobs read in the legacy 4-D form


def read_caffemodels(path: str | os.PathLike) -> Iterator[tuple[Path, caffe_pb2.NetParameter]]:
    """Each file of ``path`` (one path, or several comma-separated) and its NetParameter, read in turn."""
    for one in str(path).split(","):
        p = Path(one)
        net = read_binary_proto(p, caffe_pb2.NetParameter(), "caffemodel (binary NetParameter)")
        upgrade_net(net, str(p))  # caffe: ReadNetParamsFromBinaryFileOrDie upgrades V0/V1 files, blobs kept
        yield p, net


def layer_blobs(name: str, module: CaffeLayer, legacy: Legacy) -> list[caffe_pb2.BlobProto]:
    """Layer ``name``'s blobs as BlobProtos (float32), each in the form it was read in."""
    return [
        array_to_blob(t.detach().float().cpu().numpy(), legacy=(name, i) in legacy)
        for i, t in enumerate(module.blobs())
    ]


def copy_trained_layers(modules: Mapping[str, CaffeLayer], src: caffe_pb2.NetParameter, legacy: Legacy) -> None:
    """Copy the blobs of ``src``'s layers into the modules of the same name; records legacy blobs in ``legacy``.

    A file none of whose layers carries blobs (a net with no learnable layer) copies nothing, as in Caffe."""
    for lp in src.layer:
        if not lp.blobs:
            continue
        if lp.name not in modules:
            log.info("Ignoring source layer %s", lp.name)
            continue
        targets = modules[lp.name].blobs()
        if len(lp.blobs) != len(targets):
            raise ValueError(f"layer '{lp.name}': weights file has {len(lp.blobs)} blobs, the net has {len(targets)}")
        for i, (blob, t) in enumerate(zip(lp.blobs, targets)):
            _copy_blob(blob, t, f"layer '{lp.name}' blob {i}")
            if is_legacy(blob):
                legacy.add((lp.name, i))
            else:
                legacy.discard((lp.name, i))


def _copy_blob(blob: caffe_pb2.BlobProto, t: torch.Tensor, what: str) -> None:
    src_shape, want = blob_shape(blob), tuple(t.shape)
    # a legacy blob pads its shape to 4-D with leading 1s
    if src_shape != want and not (is_legacy(blob) and src_shape == (1,) * (4 - len(want)) + want):
        raise ValueError(f"{what}: shape mismatch: weights file has {src_shape}, net has {want}")
    with torch.no_grad():
        t.copy_(torch.from_numpy(blob_to_array(blob).reshape(want)))


def _names(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def load_weights(net: torch.nn.Module, path: str | os.PathLike, *, missing: str = "refuse") -> list[str]:
    """A CaffeNet's ``load_caffemodel(path)``, then the net's layers with blobs that got none (returned, in net order).

    Caffe copies what matches by name and says nothing of the rest, so a caffemodel of another net runs on
    fillers. ``missing``: ``refuse`` (test, classify: a ValueError naming them), ``allow`` (a warning naming
    them: --allow-missing-weights), ``finetune`` (train --weights: new layers start from their fillers, with a
    warning; refused only when the file gives weights to none).
    """
    got: set[str] = set()
    for p, src in read_caffemodels(path):
        try:
            net.copy_from(src)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        got.update(lp.name for lp in src.layer if lp.blobs)
    owners = [name for name, m in net.layers.items() if m.blobs()]
    lacking = [name for name in owners if name not in got]
    if not lacking:
        return lacking
    what = f"{path}: no weights for {len(lacking)} of the net's {len(owners)} layers with blobs ({_names(lacking)})"
    if missing == "refuse" or (missing == "finetune" and len(lacking) == len(owners)):
        hint = "--allow-missing-weights runs them on their fillers" if missing == "refuse" else "nothing to fine-tune"
        raise ValueError(f"{what}: weights are copied by layer name; is it another net's file? ({hint})")
    log.warning("%s: they start from their fillers", what)
    return lacking
