"""Channel pruning (He, Zhang & Sun, ICCV 2017): LASSO channel selection + least-squares reconstruction.

A prunable pair is a convolution A whose output reaches exactly one convolution B through
per-channel layers only (BatchNorm, Scale, ReLU, ...): removing A's output channel c removes B's
input channel c and nothing else. In ResNet bottlenecks these are branch2a->branch2b and
branch2b->branch2c; branch2c, branch1 and conv1 feed an Eltwise or a Pooling and keep their widths.
Pairs are found from the graph of blobs (bottoms/tops, in-place layers included), not from names.

For each pair in network order we sample points (random output positions of B) from a batch of
images, X = B's input patches in the PRUNED net so far and Y = B's output in the ORIGINAL net, pick
B's input channels by LASSO (penalty bisected until exactly k channels survive), refit B's weights
by least squares so that B(X_kept) ~ Y, and drop the other channels from A and its BatchNorm/Scale.
The LASSO runs on the Gram matrix Z^T Z (channels x channels), computed from X^T X and W^T W blocks,
never on the points x outputs x channels tensor Z.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from resnet_imagenet import layers as L
from resnet_imagenet.net import CaffeNet
from resnet_imagenet.prune_select import l1_select, lasso_select, reconstruct, relative_error, sample_points

log = logging.getLogger(__name__)

# Layers that act on each channel separately: A's channels can be dropped through them.
CHANNELWISE = ("BatchNorm", "Scale", "ReLU", "Sigmoid", "TanH", "Dropout")

# The released ResNet-50-2X (ethanhe42/channel-pruning temp/resnet-50-cp.prototxt): num_output of
# res*_branch2a/2b, and the Filter (channel sampler) widths of the block input each branch2a reads.
_RELEASED = (
    "2a 64 55 35, 2b 51 39 101, 2c 50 37 97, 3a 128 106 144, 3b 105 72 205, 3c 105 72 198, 3d 128 110 288, "
    "4a 256 225 278, 4b 209 147 418, 4c 204 158 407, 4d 212 155 423, 4e 211 148 412, 4f 256 213 595, "
    "5a 512 433 606, 5b 512 437 1222, 5c 512 440 1147"
)
RELEASED_WIDTHS: dict[str, int] = {}
RELEASED_FILTERS: dict[str, int] = {}  # branch2a -> channels of its input kept by the Filter layer
for _item in _RELEASED.split(", "):
    _b, _wa, _wb, _f = _item.split()
    RELEASED_WIDTHS[f"res{_b}_branch2a"], RELEASED_WIDTHS[f"res{_b}_branch2b"] = int(_wa), int(_wb)
    RELEASED_FILTERS[f"res{_b}_branch2a"] = int(_f)


@dataclass
class PrunePair:
    """conv: the layer whose outputs are pruned; next: the conv reading them; chain: layers between."""

    conv: str
    next: str
    chain: list[str]
    channels: int


def _is_plain_conv(m: nn.Module) -> bool:
    return isinstance(m, L.Convolution) and m.group == 1


def find_pairs(net: CaffeNet) -> list[PrunePair]:
    """The prunable (conv, next conv) pairs of ``net`` in network order, found from its blob graph."""
    producer: dict[str, int] = {}
    consumers: dict[int, list[int]] = {}
    lps = net.layer_params
    for i, lp in enumerate(lps):
        for b in lp.bottom:
            if b in producer:  # each bottom reads the latest writer of that blob name (in-place layers)
                consumers.setdefault(producer[b], []).append(i)
        for t in lp.top:
            producer[t] = i
    pairs = []
    for i, lp in enumerate(lps):
        if not _is_plain_conv(net.layers[lp.name]) or len(lp.top) != 1:
            continue
        chain, j = [], i
        while True:
            nxt = consumers.get(j, [])
            if len(nxt) != 1:
                break
            j = nxt[0]
            cl = lps[j]
            mod = net.layers[cl.name]
            if len(cl.bottom) != 1 or len(cl.top) != 1:
                break
            if _is_plain_conv(mod):
                pairs.append(PrunePair(lp.name, cl.name, chain, net.layers[lp.name].weight.shape[0]))
                break
            if cl.type not in CHANNELWISE or (isinstance(mod, L.Scale) and mod.weight.dim() != 1):
                break
            chain.append(cl.name)
    return pairs


# --- multiply-adds and widths -------------------------------------------------------------------


def count_params_macs(net: CaffeNet) -> tuple[int, int]:
    """Learnable parameters and per-image multiply-adds (conv: out elems x Cin/g x kh x kw; fc: in x out)."""
    params = sum(p.numel() for p in net.parameters())
    macs = sum(m.macs() for m in net.layers.values() if hasattr(m, "macs"))
    return params, macs


def planned_macs(
    net: CaffeNet, pairs: list[PrunePair], widths: dict[str, int], filters: dict[str, int] | None = None
) -> int:
    """Per-image MACs of ``net`` with pair convs cut to ``widths`` (and conv inputs to ``filters``)."""
    out_w = {p.conv: (widths.get(p.conv, p.channels), p.channels) for p in pairs}
    in_w = {p.next: (widths.get(p.conv, p.channels), p.channels) for p in pairs}
    filters = filters or {}
    total = 0
    for name, m in net.layers.items():
        if not hasattr(m, "macs"):
            continue
        macs = m.macs()
        for table in (out_w, in_w):
            if name in table:
                new, old = table[name]
                macs = macs // old * new
        if name in filters and name not in in_w:
            cin = m.weight.shape[1]
            macs = macs // cin * filters[name]
        total += macs
    return total


def check_widths(pairs: list[PrunePair], widths: dict[str, int]) -> None:
    by_name = {p.conv: p for p in pairs}
    for name, k in widths.items():
        if name not in by_name:
            raise ValueError(
                f"layer '{name}' is not a prunable convolution of this net (prunable: {', '.join(by_name) or 'none'})"
            )
        if not 1 <= k <= by_name[name].channels:
            raise ValueError(f"layer '{name}': width {k} outside 1..{by_name[name].channels}")


def widths_for_speedup(net: CaffeNet, pairs: list[PrunePair], speedup: float) -> dict[str, int]:
    """The largest uniform keep ratio r (width ceil(r * channels)) giving MACs(original)/MACs(pruned) >= speedup."""
    if not pairs:
        raise ValueError("the net has no prunable convolution pairs (conv -> [BatchNorm, Scale, ReLU] -> conv)")
    base = planned_macs(net, pairs, {})

    def at(r: float) -> dict[str, int]:
        return {p.conv: max(1, math.ceil(r * p.channels - 1e-9)) for p in pairs}

    best = base / planned_macs(net, pairs, at(0.0))
    if best < speedup:
        raise ValueError(
            f"--speedup {speedup:g} cannot be reached: even 1 channel per prunable conv gives {best:.2f}x "
            f"({len(pairs)} prunable convs; conv1, branch1, the last conv of each block and fc keep their widths)"
        )
    lo, hi = 0.0, 1.0  # speed-up(lo) >= target
    for _ in range(60):
        mid = (lo + hi) / 2
        if base / planned_macs(net, pairs, at(mid)) >= speedup:
            lo = mid
        else:
            hi = mid
    return at(lo)


# --- applying a pruning to the in-memory net ----------------------------------------------------


def apply_pair(net: CaffeNet, pair: PrunePair, keep: np.ndarray, w_next: torch.Tensor, b_next) -> None:
    """Keep channels ``keep`` of pair.conv (and its BatchNorm/Scale); give pair.next new weights."""
    idx = torch.from_numpy(keep).long()
    a = net.layers[pair.conv]
    dev = a.weight.device
    idx = idx.to(dev)
    a.weight = nn.Parameter(a.weight.data[idx].clone())
    if a.bias is not None:
        a.bias = nn.Parameter(a.bias.data[idx].clone())
    for name in pair.chain:
        m = net.layers[name]
        if isinstance(m, L.BatchNorm):
            m.mean, m.variance = m.mean[idx].clone(), m.variance[idx].clone()
        elif isinstance(m, L.Scale):
            m.weight = nn.Parameter(m.weight.data[idx].clone())
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.data[idx].clone())
            m.view = (len(keep),) + m.view[1:]
        m.bottom_shapes = [_with_channels(m.bottom_shapes[0], len(keep))]
    b = net.layers[pair.next]
    b.weight = nn.Parameter(w_next.reshape(w_next.shape[0], len(keep), *b.kernel).to(dev).contiguous())
    if b_next is not None:
        b.bias = nn.Parameter(b_next.to(dev))
    b.bottom_shapes = [_with_channels(b.bottom_shapes[0], len(keep))]
    net.layer_params_by_name(pair.conv).convolution_param.num_output = len(keep)
    for name in [pair.conv, *pair.chain]:
        for t in net.layer_params_by_name(name).top:
            net.blob_shapes[t] = _with_channels(net.blob_shapes[t], len(keep))


def _with_channels(shape: tuple[int, ...], c: int) -> tuple[int, ...]:
    return (shape[0], c, *shape[2:])


@dataclass
class LayerReport:
    layer: str
    next: str
    channels_before: int
    channels_after: int
    rel_error: float


def prune_net(
    net: CaffeNet,
    images: torch.Tensor,
    widths: dict[str, int],
    method: str = "lasso",
    points: int = 10,
    batch: int = 16,
    seed: int = 0,
) -> tuple[CaffeNet, list[LayerReport]]:
    """A pruned copy of ``net`` (``net`` untouched) with each pair's conv cut to ``widths``, pair by pair."""
    if method not in ("lasso", "l1"):
        raise ValueError(f"unknown method {method!r} (lasso, l1)")
    pairs = find_pairs(net)
    check_widths(pairs, widths)
    net.eval()
    pruned = copy.deepcopy(net)
    reports = []
    for i, pair in enumerate(pairs):
        k = widths.get(pair.conv, pair.channels)
        if k == pair.channels:
            continue
        batches = (images[s : s + batch] for s in range(0, len(images), batch))
        x, y = sample_points(net, pruned, pair.next, batches, points, seed=seed * 100003 + i)
        b = pruned.layers[pair.next]
        w_old = b.weight.detach().cpu()
        b_old = b.bias.detach().cpu() if b.bias is not None else None
        target = y - b_old if b_old is not None else y
        if method == "lasso":
            keep = lasso_select(x, target, w_old, k)
            w_new, b_new = reconstruct(x, y, keep, w_old[0, 0].numel(), b_old is not None)
        else:
            keep = l1_select(pruned.layers[pair.conv].weight, k)
            w_new, b_new = w_old[:, torch.from_numpy(keep)].reshape(len(w_old), -1), b_old
        err = relative_error(x, y, keep, w_old[0, 0].numel(), w_new, b_new)
        apply_pair(pruned, pair, keep, w_new, b_new)
        reports.append(LayerReport(pair.conv, pair.next, pair.channels, k, err))
        log.info("%s: %d -> %d channels (%s), %s relative error %.4f", pair.conv, pair.channels, k, method,
                 pair.next, err)  # fmt: skip
    return pruned, reports
