"""Data layers whose tops the layer computes itself (BVLC Caffe's dummy_data, hdf5_data, hdf5_output layers), and
WindowData's refusal. Data / ImageData / Input / MemoryData are the net's inputs instead (net.py, data/feed.py);
data_layer_shapes gives their top shapes from their parameters.

These layers have no bottoms to propagate to (caffe: DataLayer::Backward is empty); their tops need no gradient.
A non-persistent empty buffer follows the net's ``.to(device, dtype)`` so tops come out where the net runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist

from resnet_imagenet.net.layers.base import CaffeLayer, fill_, register
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError
from resnet_imagenet.util.atomic import atomic_path

log = logging.getLogger(__name__)


def data_layer_shapes(layer: caffe_pb2.LayerParameter) -> list[tuple[int, ...]]:
    """Top shapes of a data layer from its parameters alone: Input's shapes; Data/ImageData's (batch, C, crop, crop)
    or ImageData's (batch, C, new_height, new_width), and (batch,). Channels: 3 unless force_gray (or ImageData's
    is_color false); data/shapes.py reads a Datum's own channels and the first record's size."""
    if layer.type == "Input":
        shapes = [tuple(s.dim) for s in layer.input_param.shape]
        if len(shapes) == 1:
            shapes = shapes * len(layer.top)
        if len(shapes) != len(layer.top):
            raise PrototxtError(f"layer '{layer.name}': {len(layer.top)} tops but {len(shapes)} input shapes")
        return shapes
    if layer.type == "MemoryData":
        p = layer.memory_data_param
        return [(p.batch_size, p.channels, p.height, p.width), (p.batch_size,)][: len(layer.top)]
    t = layer.transform_param
    if layer.type == "Data":
        batch = layer.data_param.batch_size
        channels = 1 if t.force_gray else 3
    else:
        batch = layer.image_data_param.batch_size
        channels = 3 if layer.image_data_param.is_color else 1
    if t.crop_size:
        return [(batch, channels, t.crop_size, t.crop_size), (batch,)][: len(layer.top)]
    ip = layer.image_data_param
    if layer.type == "ImageData" and ip.new_height and ip.new_width:  # caffe: images resized to new_height x new_width
        return [(batch, channels, ip.new_height, ip.new_width), (batch,)][: len(layer.top)]
    # caffe: the shape comes from the first record, which net/ does not read (data/shapes.py does)
    raise PrototxtError(
        f"layer '{layer.name}': the input size comes from the first record without transform_param.crop_size; "
        "pass input_shapes= (resnet_imagenet.data.shapes.data_input_shapes) to CaffeNet"
    )


class _SelfFed(CaffeLayer):
    n_bottoms = (0, 0)
    feeds_itself = True  # the trainer needs no DataFeed for this layer's tops

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        if not param.top:
            raise ValueError("needs at least one top")
        self.register_buffer("_like", torch.empty(0), persistent=False)


def _per_top(values, n_top: int, what: str) -> list:
    if len(values) not in (1, n_top):
        raise ValueError(f"dummy_data_param: give {what} once, or once per top ({len(values)} for {n_top} tops)")
    return [values[0] if len(values) == 1 else values[i] for i in range(n_top)]


@register("DummyData")
class DummyData(_SelfFed):
    """Tops filled by data_filler at every forward (constant 0 without one); shapes from ``shape`` or the
    legacy num/channels/height/width (caffe: dummy_data_layer.cpp)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p, n = param.dummy_data_param, len(param.top)
        legacy = [list(getattr(p, f)) for f in ("num", "channels", "height", "width")]
        if any(legacy):
            if p.shape:
                raise ValueError("dummy_data_param: give shape or num/channels/height/width, not both")
            cols = [_per_top(v, n, f) for v, f in zip(legacy, ("num", "channels", "height", "width"))]
            self.shapes = [tuple(int(c[i]) for c in cols) for i in range(n)]
        else:
            self.shapes = [tuple(int(d) for d in s.dim) for s in _per_top(list(p.shape), n, "shape")]
        fillers = list(p.data_filler)
        self.fillers = [None] * n if not fillers else _per_top(fillers, n, "data_filler")
        for f in self.fillers:  # an unknown filler type fails here, not at the first forward
            fill_(torch.empty(2, 2), f)

    def top_shapes(self):
        return self.shapes

    def forward(self):
        outs = []
        for shape, f in zip(self.shapes, self.fillers):
            t = torch.empty(shape, dtype=self._like.dtype, device=self._like.device)
            fill_(t, f)
            outs.append(t)
        return tuple(outs) if len(outs) > 1 else outs[0]


@register("HDF5Data")
class HDF5Data(_SelfFed):
    """Rows of the datasets named like the tops, from the .h5 files listed in hdf5_data_param.source, batch_size
    at a time; files and rows in order, or shuffled (caffe: hdf5_data_layer.cpp). In a TRAIN net run by several
    processes each takes every world_size-th row from its rank (caffe: HDF5DataLayer::Skip)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.hdf5_data_param
        self.tops, self.batch, self.shuffle = list(param.top), p.batch_size, p.shuffle
        if self.batch <= 0:
            raise ValueError("hdf5_data_param.batch_size must be positive")
        try:
            self.files = Path(p.source).read_text().split()  # caffe: source_file >> line
        except OSError as e:
            raise FileNotFoundError(f"layer '{param.name}': {p.source}: cannot read: {e.strerror}") from None
        if not self.files:
            raise ValueError(f"{p.source} must list at least 1 HDF5 file")
        log.info("Number of HDF5 files: %d", len(self.files))
        self.file_order = self._order(len(self.files))
        self.current_file, self.offset = 0, 0
        self._load(self.files[self.file_order[0]])
        self.shapes = [(self.batch, *a.shape[1:]) for a in self.arrays]

    def _order(self, n: int) -> list[int]:
        # a net built on the meta device (net/cost.py's footprint) needs no order, nor may it draw random numbers
        meta = torch.empty(0).device.type == "meta"
        return torch.randperm(n).tolist() if self.shuffle and not meta else list(range(n))

    def _load(self, path: str) -> None:
        """caffe: LoadHDF5FileData -- every top's dataset, as float, with one row count."""
        try:
            with h5py.File(path, "r") as f:
                missing = [t for t in self.tops if t not in f]
                if missing:
                    raise ValueError(f"{path}: no dataset {missing[0]!r} (the datasets are named like the tops)")
                arrays = [np.asarray(f[t], dtype=np.float32) for t in self.tops]
        except OSError as e:
            raise FileNotFoundError(f"layer '{self.name}': {path}: cannot read as HDF5: {e}") from None
        rows = {a.shape[0] if a.ndim else 0 for a in arrays}
        if len(rows) != 1 or 0 in rows:
            raise ValueError(f"{path}: the datasets {self.tops} need one positive row count, have {sorted(rows)}")
        if hasattr(self, "shapes") and [a.shape[1:] for a in arrays] != [s[1:] for s in self.shapes]:
            raise ValueError(f"{path}: row shapes {[a.shape[1:] for a in arrays]} differ from the first file's")
        log.info("Successfully loaded %d rows from %s", rows.pop(), path)
        self.arrays = arrays
        self.rows = self._order(arrays[0].shape[0])
        self.current_row = 0

    def _next(self) -> None:
        """caffe: HDF5DataLayer::Next -- the next row, then the next file (reshuffled at the wrap)."""
        self.current_row += 1
        if self.current_row == len(self.rows):
            if len(self.files) > 1:
                self.current_file += 1
                if self.current_file == len(self.files):
                    self.current_file = 0
                    if self.shuffle:
                        self.file_order = self._order(len(self.files))
                self._load(self.files[self.file_order[self.current_file]])
            self.current_row = 0
            if self.shuffle:
                self.rows = self._order(len(self.rows))
        self.offset += 1

    def position(self) -> dict:
        """Where the next batch starts (file order, file, row order, row, rows passed), for a snapshot."""
        return {"layer": self.name, "file_order": torch.tensor(self.file_order), "current_file": self.current_file,
                "rows": torch.tensor(self.rows), "current_row": self.current_row, "offset": self.offset}  # fmt: skip

    def seek(self, pos: dict) -> None:
        """Go on from a position() (a resumed run reads the rows the uninterrupted one would have)."""
        order, rows = [int(i) for i in pos["file_order"]], [int(r) for r in pos["rows"]]
        if pos["layer"] != self.name or sorted(order) != list(range(len(self.files))):
            raise ValueError(f"layer '{self.name}': the saved read position is for another layer or file list")
        self.file_order, self.current_file = order, int(pos["current_file"])
        with torch.random.fork_rng(devices=[]):  # _load's row shuffle must not move the random stream
            self._load(self.files[order[self.current_file]])
        if sorted(rows) != list(range(len(self.rows))):
            raise ValueError(f"layer '{self.name}': the saved read position is for a file of {len(rows)} rows")
        self.rows, self.current_row, self.offset = rows, int(pos["current_row"]), int(pos["offset"])

    def _skip(self) -> bool:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return self.offset % dist.get_world_size() != dist.get_rank()

    def top_shapes(self):
        return self.shapes

    def forward(self):
        picked: list[list[np.ndarray]] = [[] for _ in self.tops]
        try:
            for _ in range(self.batch):
                while self._skip():
                    self._next()
                for j, a in enumerate(self.arrays):
                    picked[j].append(a[self.rows[self.current_row]])
                self._next()
        except ValueError as e:  # a later file that does not fit
            raise ValueError(f"layer '{self.name}': {e}") from None
        outs = tuple(
            torch.from_numpy(np.stack(rows)).to(device=self._like.device, dtype=self._like.dtype) for rows in picked
        )
        return outs if len(outs) > 1 else outs[0]


def _legacy_4d(shape: tuple[int, ...]) -> tuple[int, ...]:
    # caffe: HDF5OutputLayer reshapes to num x channels x height x width before saving
    if len(shape) > 4:
        raise ValueError(f"a bottom of {len(shape)} axes {shape} has no num/channels/height/width form")
    return tuple(shape) + (1,) * (4 - len(shape))


@register("HDF5Output")
class HDF5Output(CaffeLayer):
    """Writes its two bottoms as datasets "data" and "label" (N x C x H x W, float) to hdf5_output_param.file_name
    (caffe: hdf5_output_layer.cpp). Caffe writes the first forward only (a second one fails to re-create the
    datasets); here each forward appends its rows, and the file is rewritten whole through a temporary name."""

    n_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.file_name = param.hdf5_output_param.file_name
        if not self.file_name:
            raise ValueError("hdf5_output_param.file_name must be given")
        if bottom_shapes[0][:1] != bottom_shapes[1][:1]:
            raise ValueError(f"data {bottom_shapes[0]} and label {bottom_shapes[1]} need the same batch size")
        self.shapes = [_legacy_4d(s) for s in bottom_shapes]
        self.saved: list[list[np.ndarray]] = [[], []]

    def top_shapes(self):
        return []

    def forward(self, data, label):
        for rows, b in zip(self.saved, (data, label)):
            rows.append(b.detach().float().cpu().numpy().reshape(b.shape[0], *_legacy_4d(tuple(b.shape))[1:]))
        with atomic_path(self.file_name) as tmp, h5py.File(tmp, "w") as f:
            for name, rows in zip(("data", "label"), self.saved):
                f.create_dataset(name, data=np.concatenate(rows))
        log.info("Successfully saved %d rows to %s", sum(len(r) for r in self.saved[0]), self.file_name)
        return ()


@register("WindowData")
class WindowData(CaffeLayer):
    """Refused: R-CNN's window-file reader (warped region crops with fg/bg sampling)."""

    n_bottoms = (0, 0)

    def __init__(self, param, bottom_shapes):
        raise ValueError(
            "WindowData is not supported: it reads R-CNN window files (selective-search boxes warped per batch), "
            "a pipeline R-CNN's own authors retired for Fast/Faster R-CNN's ROI pooling; crop the windows "
            "into an LMDB (convert_imageset) or an ImageData list instead"
        )
