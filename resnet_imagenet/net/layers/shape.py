"""Layers that move, copy or select values without arithmetic (BVLC Caffe's common layers that change blob
shapes): Concat, Slice, Split, Flatten, Reshape, Tile, Crop, BatchReindex, Filter (both kinds), Silence."""

from __future__ import annotations

import math

import torch

from resnet_imagenet.net.layers.base import CaffeLayer, Shape, register

MANY = 1 << 30


def canonical_axis(axis: int, n_axes: int, what: str = "axis") -> int:
    """caffe: Blob::CanonicalAxisIndex -- a negative axis counts from the end; out of range is an error."""
    if not -n_axes <= axis < n_axes:
        raise ValueError(f"{what} {axis} is out of range for a blob with {n_axes} axes")
    return axis % n_axes


@register("Concat")
class Concat(CaffeLayer):
    """caffe: concat_layer.cpp -- bottoms joined along ``axis`` (or the deprecated concat_dim)."""

    n_bottoms = (1, MANY)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise ValueError("give either axis or concat_dim, not both")
        axis = p.concat_dim if p.HasField("concat_dim") else p.axis
        self.axis = canonical_axis(axis, len(bottom_shapes[0]))
        for s in bottom_shapes:
            if len(s) != len(bottom_shapes[0]) or any(
                a != b for i, (a, b) in enumerate(zip(s, bottom_shapes[0])) if i != self.axis
            ):
                raise ValueError(f"bottom shapes {bottom_shapes} differ outside axis {self.axis}")

    def top_shapes(self):
        s = list(self.bottom_shapes[0])
        s[self.axis] = sum(b[self.axis] for b in self.bottom_shapes)
        return [tuple(s)]

    def forward(self, *xs):
        return torch.cat(xs, self.axis)


@register("Slice")
class Slice(CaffeLayer):
    """caffe: slice_layer.cpp -- one bottom cut along ``axis`` (or slice_dim) at the slice points, or into
    equal parts (one per top) when none are given."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise ValueError("give either axis or slice_dim, not both")
        shape = bottom_shapes[0]
        self.axis = canonical_axis(p.slice_dim if p.HasField("slice_dim") else p.axis, len(shape))
        n_tops, dim = max(1, len(param.top)), shape[self.axis]
        points = list(p.slice_point)
        if points:
            if len(points) != n_tops - 1:
                raise ValueError(f"{len(points)} slice points for {n_tops} tops (need {n_tops - 1})")
            bounds = [0, *points, dim]
            self.sizes = [b - a for a, b in zip(bounds, bounds[1:])]
            if min(self.sizes) <= 0:
                raise ValueError(f"slice points {points} must increase within 1..{dim - 1} (axis {self.axis})")
        else:
            if dim % n_tops:
                raise ValueError(f"axis {self.axis} of size {dim} does not split into {n_tops} equal parts")
            self.sizes = [dim // n_tops] * n_tops

    def top_shapes(self):
        s = self.bottom_shapes[0]
        return [s[: self.axis] + (n,) + s[self.axis + 1 :] for n in self.sizes]

    def forward(self, x):
        parts = torch.split(x, self.sizes, self.axis)
        return parts if len(parts) > 1 else parts[0]


@register("Split")
class Split(CaffeLayer):
    """One bottom shared by several tops (Caffe inserts these itself; prototxts may too)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        self.n_tops = max(1, len(param.top))

    def top_shapes(self):
        return [self.bottom_shapes[0]] * self.n_tops

    def forward(self, x):
        return (x,) * self.n_tops


@register("Flatten")
class Flatten(CaffeLayer):
    """caffe: flatten_layer.cpp -- axes axis..end_axis (both inclusive, both may be negative) become one."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        n = len(bottom_shapes[0])
        self.start = canonical_axis(param.flatten_param.axis, n)
        self.end = canonical_axis(param.flatten_param.end_axis, n, "end_axis")

    def top_shapes(self):
        s = self.bottom_shapes[0]
        return [s[: self.start] + (math.prod(s[self.start : self.end + 1]),) + s[self.end + 1 :]]

    def forward(self, x):
        return x.flatten(self.start, self.end)


@register("Reshape")
class Reshape(CaffeLayer):
    """caffe: reshape_layer.cpp -- bottom axes [axis, axis + num_axes) replaced by ``shape``: a 0 copies the
    bottom's dimension at that place, one -1 is inferred from the count."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.reshape_param
        bottom = bottom_shapes[0]
        n = len(bottom)
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise ValueError(f"axis {p.axis} is out of range for a blob with {n} axes")
        end = n if p.num_axes == -1 else start + p.num_axes
        if p.num_axes < -1 or end > n:
            raise ValueError(f"num_axes {p.num_axes} from axis {start} exceeds the {n} bottom axes")
        dims = list(p.shape.dim)
        if dims.count(-1) > 1:
            raise ValueError("at most one dimension of reshape_param.shape may be -1")
        new = []
        for i, d in enumerate(dims):
            if d == 0:
                if start + i >= n:
                    raise ValueError(f"shape dim {i} is 0 but the bottom has no axis {start + i} to copy")
                d = bottom[start + i]
            elif d < -1:
                raise ValueError(f"shape dim {d} is invalid (use a positive size, 0 to copy or -1 to infer)")
            new.append(d)
        top = list(bottom[:start]) + new + list(bottom[end:])
        if -1 in top:
            known = math.prod(d for d in top if d != -1)
            if known == 0 or math.prod(bottom) % known:
                raise ValueError(f"cannot infer the -1 in {tuple(top)} from bottom shape {bottom}")
            top[top.index(-1)] = math.prod(bottom) // known
        if math.prod(top) != math.prod(bottom):
            raise ValueError(f"top shape {tuple(top)} has a different count than bottom shape {bottom}")
        self.shape = tuple(top)

    def top_shapes(self):
        return [self.shape]

    def forward(self, x):
        return x.reshape(self.shape)


@register("Tile")
class Tile(CaffeLayer):
    """caffe: tile_layer.cpp -- the block from ``axis`` on is repeated ``tiles`` times along ``axis``."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.tile_param
        self.axis = canonical_axis(p.axis, len(bottom_shapes[0]))
        if p.tiles < 1:
            raise ValueError(f"tile_param.tiles must be positive, got {p.tiles}")
        self.tiles = p.tiles

    def top_shapes(self):
        s = list(self.bottom_shapes[0])
        s[self.axis] *= self.tiles
        return [tuple(s)]

    def forward(self, x):
        reps = [1] * x.dim()
        reps[self.axis] = self.tiles
        return x.repeat(reps)


@register("Crop")
class Crop(CaffeLayer):
    """caffe: crop_layer.cpp -- bottom 0 cropped to bottom 1's shape on the axes from ``axis`` on, starting at
    ``offset`` (none: 0; one: every such axis; else one per axis). Bottom 1 gets no gradient."""

    n_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.crop_param
        a, b = bottom_shapes
        start = canonical_axis(p.axis, len(a))
        offs = list(p.offset)
        if len(offs) > 1 and len(offs) != len(a) - start:
            raise ValueError(f"{len(offs)} offsets for the {len(a) - start} axes from axis {start}")
        if len(b) != len(a):
            raise ValueError(f"bottoms have {len(a)} and {len(b)} axes")
        self.slices = []
        for i in range(len(a)):
            off = 0 if i < start or not offs else offs[0] if len(offs) == 1 else offs[i - start]
            size = a[i] if i < start else b[i]
            if a[i] - off < size:
                raise ValueError(f"cannot crop {size} at offset {off} from axis {i} of size {a[i]}")
            self.slices.append(slice(off, off + size))

    def top_shapes(self):
        return [tuple(s.stop - s.start for s in self.slices)]

    def forward(self, x, _like):
        return x[tuple(self.slices)]


@register("BatchReindex")
class BatchReindex(CaffeLayer):
    """caffe: batch_reindex_layer.cpp -- top[i] = bottom0[permut[i]] for the 1-D index bottom ``permut``;
    the gradient adds back into the items picked (no gradient to the indices)."""

    n_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        if len(bottom_shapes[1]) != 1:
            raise ValueError(f"the index bottom must be 1-D, got shape {bottom_shapes[1]}")

    def top_shapes(self):
        return [self.bottom_shapes[1] + self.bottom_shapes[0][1:]]

    def forward(self, x, permut):
        return x.index_select(0, permut.detach().long())


@register("Filter")
class Filter(CaffeLayer):
    """Two layers share this type, told apart by their bottoms. One bottom: caffe-pro's channel sampler
    (keep the channels whose ``selector`` blob entry is non-zero). Two or more: BVLC's (BatchFilter)."""

    blob_names = ("selector",)

    def __new__(cls, param=None, bottom_shapes=(), *args, **kwargs):
        if cls is Filter and len(bottom_shapes) >= 2:
            return super().__new__(BatchFilter)
        return super().__new__(cls)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.filter_param
        self.axis = canonical_axis(p.axis, len(bottom_shapes[0]))
        self.num_output = p.num_output
        c = bottom_shapes[0][self.axis]
        if not 0 < self.num_output <= c:
            raise ValueError(f"filter_param.num_output {self.num_output} must be in 1..{c}")
        sel = torch.zeros(c)
        sel[: self.num_output] = 1.0
        self.register_buffer("selector", sel)

    def top_shapes(self):
        s = list(self.bottom_shapes[0])
        s[self.axis] = self.num_output
        return [tuple(s)]

    def forward(self, x):
        idx = self.selector.nonzero().flatten()
        if idx.numel() != self.num_output:
            raise ValueError(
                f"layer '{self.name}': selector keeps {idx.numel()} channels, num_output is {self.num_output}"
            )
        return x.index_select(self.axis, idx.to(x.device))


class BatchFilter(Filter):
    """caffe: filter_layer.cpp -- bottoms 0..k-1 keep the items (axis 0) whose selector (the last bottom, one
    value per item) is non-zero, one top per filtered bottom. Top shapes are given as the whole batch (Caffe's
    first Reshape); at run time they hold the kept items. The selector gets no gradient."""

    blob_names = ()
    n_bottoms = (2, MANY)

    def __init__(self, param, bottom_shapes):
        CaffeLayer.__init__(self, param, bottom_shapes)
        sel = bottom_shapes[-1]
        if any(d != 1 for d in sel[1:]) or not sel:
            raise ValueError(f"selector dimensions must be singletons (1), except the first: {sel}")
        if any(s[0] != sel[0] for s in bottom_shapes[:-1] if s):
            raise ValueError(f"each bottom needs the selector's first dimension {sel[0]}: {bottom_shapes}")
        if len(param.top) != len(bottom_shapes) - 1:
            raise ValueError(f"needs {len(bottom_shapes) - 1} tops (one per filtered bottom), got {len(param.top)}")

    def top_shapes(self):
        return list(self.bottom_shapes[:-1])

    def forward(self, *xs):
        keep = xs[-1].detach().reshape(-1).nonzero().flatten()
        out = tuple(x.index_select(0, keep) for x in xs[:-1])
        return out if len(out) > 1 else out[0]


@register("Silence")
class Silence(CaffeLayer):
    """caffe: silence_layer.cpp -- consumes its bottoms, has no top; its backward gives them zero gradient."""

    n_bottoms = (1, MANY)

    def top_shapes(self) -> list[Shape]:
        return []

    def forward(self, *xs):
        return ()
