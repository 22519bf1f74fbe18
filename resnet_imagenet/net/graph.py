"""The blob graph of a net: which value of which blob each layer reads and writes.

Caffe lets a layer write a blob it (or another layer) already wrote -- in-place ReLU, BatchNorm and Scale
-- so a blob name alone does not say which value a bottom reads. Here each write makes a new *version*
of the blob: a net input is version 0, the first layer that writes the blob makes version 1, and so on.
A bottom reads the blob's newest version at that point (Caffe's Net::AppendBottom looks the name up in
the blobs produced so far). Used by CaffeNet's in-place planning, pruning's pair search and the Filter code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from resnet_imagenet.proto import caffe_pb2

Value = tuple[str, int]  # (blob name, version)


@dataclass
class BlobGraph:
    reads: list[list[Value]] = field(default_factory=list)  # layer index -> the value each bottom reads
    writes: list[list[Value]] = field(default_factory=list)  # layer index -> the value each top makes
    producer: dict[Value, int] = field(default_factory=dict)  # value -> index of the layer that wrote it
    readers: dict[Value, list[int]] = field(default_factory=dict)  # value -> indices of its readers, in order

    def consumers(self, i: int) -> list[int]:
        """Indices of the layers reading what layer ``i`` wrote, once per bottom that reads it."""
        return [k for v in self.writes[i] for k in self.readers.get(v, [])]


def blob_graph(layers: Sequence[caffe_pb2.LayerParameter]) -> BlobGraph:
    """The BlobGraph of ``layers`` in net order (already filtered to one phase)."""
    g = BlobGraph()
    version: dict[str, int] = {}
    for k, lp in enumerate(layers):
        g.reads.append([(b, version.get(b, 0)) for b in lp.bottom])
        for v in g.reads[-1]:
            g.readers.setdefault(v, []).append(k)
        g.writes.append([])
        for t in lp.top:
            version[t] = version.get(t, 0) + 1
            g.writes[-1].append((t, version[t]))
            g.producer[(t, version[t])] = k
    return g
