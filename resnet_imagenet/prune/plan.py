"""How wide each pruned layer gets: widths for a speed-up, the released widths, widths read from a prototxt.

Multiply-adds are net/cost.py's count (count_params_macs, the layers' macs()); a plan only rescales the
layers whose widths it changes.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from resnet_imagenet.net.cost import count_params_macs
from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto.text import read_net
from resnet_imagenet.prune.graph import PrunePair

if TYPE_CHECKING:
    from resnet_imagenet.prune.residual import ResidualGroup

# The released ResNet-50-2X (ethanhe42/channel-pruning temp/resnet-50-cp.prototxt): num_output of
# res*_branch2a/2b, and the Filter (channel sampler) widths of the block input each branch2a reads.
_RELEASED = (
    "2a 64 55 35, 2b 51 39 101, 2c 50 37 97, 3a 128 106 144, 3b 105 72 205, 3c 105 72 198, 3d 128 110 288, "
    "4a 256 225 278, 4b 209 147 418, 4c 204 158 407, 4d 212 155 423, 4e 211 148 412, 4f 256 213 595, "
    "5a 512 433 606, 5b 512 437 1222, 5c 512 440 1147"
)


def _released() -> tuple[dict[str, int], dict[str, int]]:
    widths, filters = {}, {}
    for item in _RELEASED.split(", "):
        block, wa, wb, f = item.split()
        widths[f"res{block}_branch2a"], widths[f"res{block}_branch2b"] = int(wa), int(wb)
        filters[f"res{block}_branch2a"] = int(f)
    return widths, filters


RELEASED_WIDTHS: dict[str, int]
RELEASED_FILTERS: dict[str, int]  # branch2a -> channels of its input kept by the Filter layer
RELEASED_WIDTHS, RELEASED_FILTERS = _released()


def planned_macs(
    net: CaffeNet,
    pairs: list[PrunePair],
    widths: dict[str, int],
    filters: dict[str, int] | None = None,
    residual: list[tuple[ResidualGroup, int]] | None = None,
) -> int:
    """Per-image MACs of ``net`` with pair convs cut to ``widths`` (and conv inputs to ``filters``, and the
    residual groups' channels to their widths: producers' outputs and consumers' inputs)."""
    out_w = {p.conv: (widths.get(p.conv, p.channels), p.channels) for p in pairs}
    in_w = {p.next: (widths.get(p.conv, p.channels), p.channels) for p in pairs}
    for name, k in (filters or {}).items():
        if name not in in_w:
            in_w[name] = (k, net.layers[name].weight.shape[1])
    for group, k in residual or []:
        out_w.update({name: (k, group.channels) for name in group.producers})
        in_w.update({name: (k, group.channels) for name in group.consumers})
    total = count_params_macs(net)[1]
    for name in {*out_w, *in_w}:
        m = net.layers[name] if name in net.layers else None
        if not hasattr(m, "macs"):
            continue
        macs = new = m.macs()
        for table in (out_w, in_w):
            if name in table:
                k, channels = table[name]
                new = new // channels * k
        total += new - macs
    return total


def check_widths(pairs: list[PrunePair], widths: dict[str, int]) -> None:
    """Every named layer must be a pair's conv, with a width in 1..its channels (else a ValueError)."""
    by_name = {p.conv: p for p in pairs}
    for name, k in widths.items():
        if name not in by_name:
            raise ValueError(
                f"layer '{name}' is not a prunable convolution of this net (prunable: {', '.join(by_name) or 'none'})"
            )
        if not 1 <= k <= by_name[name].channels:
            raise ValueError(f"layer '{name}': width {k} outside 1..{by_name[name].channels}")


def keep_width(r: float, channels: int, multiple: int = 1) -> int:
    """Keep ratio ``r`` as a width: ceil(r * channels), at least 1, rounded UP to a multiple of ``multiple``
    (capped at ``channels``: a layer narrower than the multiple keeps its width)."""
    k = max(1, math.ceil(r * channels - 1e-9))
    return min(channels, -(-k // multiple) * multiple)


def round_widths(widths: dict[str, int], channels: dict[str, int], multiple: int) -> dict[str, int]:
    """``widths`` rounded UP to multiples of ``multiple`` (capped at each layer's ``channels``)."""
    return {name: min(channels[name], -(-k // multiple) * multiple) for name, k in widths.items()}


def _at(r: float, channels: dict[str, int], multiple: int = 1) -> dict[str, int]:
    return {name: keep_width(r, c, multiple) for name, c in channels.items()}


def plan_for_speedup(
    net: CaffeNet,
    pairs: list[PrunePair],
    speedup: float,
    inputs: dict[str, int] | None = None,
    multiple: int = 1,
    residual: list[tuple[ResidualGroup, int]] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """(widths, filters) of the largest uniform keep ratio r (width ceil(r * channels), rounded up to a
    ``multiple``) giving MACs(original) / MACs(pruned) >= ``speedup``; ``inputs`` (conv -> its input channels,
    see prune.filter.filter_targets) get input Filters of the same width rule; ``residual`` (fixed group
    widths, prune/residual.py) are counted as given. Rounding up keeps the target: r is bisected on the
    rounded widths, so a rounded plan gets a lower r than an unrounded one."""
    if not pairs:
        raise ValueError("the net has no prunable convolution pairs (conv -> [BatchNorm, Scale, ReLU] -> conv)")
    inputs = inputs or {}
    chans = {p.conv: p.channels for p in pairs}
    base = planned_macs(net, pairs, {})

    def macs(r: float) -> int:
        return planned_macs(net, pairs, _at(r, chans, multiple), _at(r, inputs, multiple), residual)

    best = base / macs(0.0)
    if best < speedup:
        rounded = f", widths rounded up to multiples of {multiple}" if multiple > 1 else ""
        raise ValueError(
            f"--speedup {speedup:g} cannot be reached: even 1 channel per prunable conv gives {best:.2f}x "
            f"({len(pairs)} prunable convs{rounded}; conv1, branch1, the last conv of each block and fc keep "
            "their widths unless --residual prunes them)"
        )
    lo, hi = 0.0, 1.0  # speed-up(lo) >= target
    for _ in range(60):
        mid = (lo + hi) / 2
        if base / macs(mid) >= speedup:
            lo = mid
        else:
            hi = mid
    filters = {name: k for name, k in _at(lo, inputs, multiple).items() if k < inputs[name]}
    return _at(lo, chans, multiple), filters


def read_widths(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, int]]:
    """Widths from a pruned prototxt: num_output of every Convolution, and for a conv reading a
    Filter layer's top, that Filter's num_output (the channels of its input it keeps)."""
    net = read_net(path)
    filters = {lp.top[0]: lp.filter_param.num_output for lp in net.layer if lp.type == "Filter"}
    widths = {lp.name: lp.convolution_param.num_output for lp in net.layer if lp.type == "Convolution"}
    inputs = {
        lp.name: filters[lp.bottom[0]] for lp in net.layer if lp.type == "Convolution" and lp.bottom[0] in filters
    }
    return widths, inputs
