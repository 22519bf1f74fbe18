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

from resnet_imagenet.net import layers as L
from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.prune.filter import apply_filter, check_filters, with_full_filters
from resnet_imagenet.prune.fit import Samples, l1_select, lasso_select, predict, reconstruct, sample_points

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


def _consumers(net: CaffeNet) -> dict[int, list[int]]:
    """Layer index -> indices of the layers reading its tops (each bottom reads its blob's latest writer)."""
    producer: dict[str, int] = {}
    consumers: dict[int, list[int]] = {}
    for i, lp in enumerate(net.layer_params):
        for b in lp.bottom:
            if b in producer:
                consumers.setdefault(producer[b], []).append(i)
        for t in lp.top:
            producer[t] = i
    return consumers


def _per_channel(net: CaffeNet, lp) -> bool:
    mod = net.layers[lp.name]
    return len(lp.bottom) == 1 and len(lp.top) == 1 and not (isinstance(mod, L.Scale) and mod.weight.dim() != 1)


def find_pairs(net: CaffeNet) -> list[PrunePair]:
    """The prunable (conv, next conv) pairs of ``net`` in network order, found from its blob graph."""
    consumers = _consumers(net)
    lps = net.layer_params
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
            if len(cl.bottom) != 1 or len(cl.top) != 1:
                break
            if _is_plain_conv(net.layers[cl.name]):
                pairs.append(PrunePair(lp.name, cl.name, chain, net.layers[lp.name].weight.shape[0]))
                break
            if cl.type not in CHANNELWISE or not _per_channel(net, cl):
                break
            chain.append(cl.name)
    return pairs


@dataclass
class ResidualSum:
    """conv's output reaches bottom ``main`` of the Eltwise SUM ``eltwise`` through the per-channel
    affine layers ``affine`` (BatchNorm, Scale): y_sum = scale * conv + shift + the other bottoms."""

    eltwise: str
    main: int
    affine: list[str]


def find_residual_sum(net: CaffeNet, conv: str) -> ResidualSum | None:
    """How ``conv`` (a ResNet branch2c) feeds a residual sum, or None when it does not."""
    consumers = _consumers(net)
    lps = net.layer_params
    j = next(i for i, lp in enumerate(lps) if lp.name == conv)
    affine: list[str] = []
    while True:
        nxt = consumers.get(j, [])
        if len(nxt) != 1:
            return None
        top, j = lps[j].top[0], nxt[0]
        cl = lps[j]
        if cl.type == "Eltwise":
            mod = net.layers[cl.name]
            if mod.op != caffe_pb2.EltwiseParameter.SUM or list(cl.bottom).count(top) != 1:
                return None
            main = list(cl.bottom).index(top)
            return ResidualSum(cl.name, main, affine) if mod.coeff[main] != 0 else None
        if cl.type not in ("BatchNorm", "Scale") or not _per_channel(net, cl):
            return None
        affine.append(cl.name)


def residual_affine(net: CaffeNet, res: ResidualSum, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel with Eltwise output = scale * conv output + shift + other bottoms."""
    dev = next(net.parameters()).device
    v = torch.tensor([0.0, 1.0], device=dev).view(2, 1, 1, 1).expand(2, channels, 1, 1).contiguous()
    with torch.no_grad():  # the affine layers in TEST mode (BatchNorm: global statistics) are exact on 0 and 1
        for name in res.affine:
            v = net.layers[name](v)
    c = net.layers[res.eltwise].coeff[res.main]
    v = v.flatten(1).double().cpu() * c
    return v[1] - v[0], v[0]


# --- multiply-adds and widths -------------------------------------------------------------------


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
    return plan_for_speedup(net, pairs, speedup)[0]


def plan_for_speedup(
    net: CaffeNet, pairs: list[PrunePair], speedup: float, inputs: dict[str, int] | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """(widths, filters) of the largest uniform keep ratio r reaching ``speedup``; ``inputs`` (conv -> its
    input channels, see prune_filter.filter_targets) get input Filters of ceil(r * channels) too."""
    if not pairs:
        raise ValueError("the net has no prunable convolution pairs (conv -> [BatchNorm, Scale, ReLU] -> conv)")
    inputs = inputs or {}
    base = planned_macs(net, pairs, {})

    def at(r: float, table) -> dict[str, int]:
        return {name: max(1, math.ceil(r * c - 1e-9)) for name, c in table.items()}

    def macs(r: float) -> int:
        return planned_macs(net, pairs, at(r, chans), at(r, inputs))

    chans = {p.conv: p.channels for p in pairs}
    best = base / macs(0.0)
    if best < speedup:
        raise ValueError(
            f"--speedup {speedup:g} cannot be reached: even 1 channel per prunable conv gives {best:.2f}x "
            f"({len(pairs)} prunable convs; conv1, branch1, the last conv of each block and fc keep their widths)"
        )
    lo, hi = 0.0, 1.0  # speed-up(lo) >= target
    for _ in range(60):
        mid = (lo + hi) / 2
        if base / macs(mid) >= speedup:
            lo = mid
        else:
            hi = mid
    filters = {name: k for name, k in at(lo, inputs).items() if k < inputs[name]}
    return at(lo, chans), filters


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
    """rel_error: on held-out sampled points (not fitted), of ``measured_at``: the next conv's output, or
    for a conv feeding a residual sum (branch2c) that Eltwise's output, what the shortcut fix matches."""

    layer: str
    next: str
    channels_before: int
    channels_after: int
    rel_error: float
    measured_at: str
    fit_points: int
    columns: int


HOLD_OUT = 0.2  # share of the sampled points kept out of the fit to measure rel_error


def _fit(sm: Samples, w_old: torch.Tensor, b_old, k: int, scale, shortcut: bool):
    """LASSO + least squares on ``sm``; with ``scale`` (branch2c) the residual sum is what is matched."""
    kk = w_old[0, 0].numel()
    target, w_sel, y_fit = sm.y - b_old if b_old is not None else sm.y, w_old, sm.y
    if scale is not None and shortcut:
        # He et al. 2017 sec. 3.3: branch2c reconstructs original branch + (original - pruned) shortcut.
        # LASSO in the sum's space (rows weighted by the BN/Scale factor); the per-channel least squares
        # solves for the conv output, so the drift goes back through the affine: y + drift / scale.
        s = scale.float()
        target, w_sel = target * s + sm.drift, w_old * s.view(-1, 1, 1, 1)
        ok = s.abs() > s.abs().max() * 1e-6  # a channel scaled to ~0 cannot carry the shortcut's drift
        y_fit = sm.y + torch.where(ok, sm.drift / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(s))
    keep = lasso_select(sm.x, target, w_sel, k)
    w_new, b_new = reconstruct(sm.x, y_fit, keep, kk, b_old is not None)
    return keep, w_new, b_new


def _error(sm: Samples, keep: np.ndarray, kk: int, w, b, scale) -> float:
    pred = predict(sm.x, keep, kk, w, b)
    if scale is None:
        diff, ref = pred - sm.y, sm.y
    else:  # error of the Eltwise output: scale * (conv - original conv) - shortcut drift
        diff, ref = (pred - sm.y) * scale.float() - sm.drift, sm.ref
    return float(diff.norm() / ref.norm().clamp(min=1e-30))


def _held_out(sm: Samples, seed: int) -> tuple[Samples, Samples]:
    """(held-out, fitting) split of the sampled points."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(sm.x)))
    n_held = int(len(order) * HOLD_OUT)
    return (sm.split(order[:n_held]), sm.split(order[n_held:])) if n_held else (sm, sm)


def _warn_few(layer: str, fit: Samples, columns: int) -> None:
    if len(fit.x) < 2 * columns:
        log.warning("%s: %d fitting points for %d least-squares columns (< 2x): the fit may interpolate;"
                    " raise --images or --points-per-image", layer, len(fit.x), columns)  # fmt: skip


def _prune_input(net, pruned, conv: str, fname: str, k: int, batches, method: str, points: int, seed: int):
    """Narrow the Filter ``fname`` in front of ``conv`` to ``k`` of its input channels: LASSO on conv's input
    (pruned net) against its output (original net), then conv refitted by least squares; a LayerReport."""
    c = pruned.layers[conv]
    w_old = c.weight.detach().cpu()
    b_old = c.bias.detach().cpu() if c.bias is not None else None
    kk, cin = w_old[0, 0].numel(), w_old.shape[1]
    held, fit = _held_out(sample_points(net, pruned, conv, batches, points, seed), seed)
    columns = k * kk + (b_old is not None)
    if method == "lasso":
        keep, w_new, b_new = _fit(fit, w_old, b_old, k, None, False)
        _warn_few(conv, fit, columns)
    else:  # the baseline: the input channels with the largest L1 norm of conv's weights, no refit
        keep = l1_select(w_old.transpose(0, 1), k)
        w_new, b_new = w_old[:, torch.from_numpy(keep)].reshape(len(w_old), -1), b_old
    err = _error(held, keep, kk, w_new, b_new, None)
    apply_filter(pruned, fname, conv, keep, w_new, b_new)
    log.info("%s: input %d -> %d channels (%s), %s relative error %.4f (held-out points)", fname, cin, k,
             method, conv, err)  # fmt: skip
    return LayerReport(fname, conv, cin, k, err, conv, len(fit.x), columns)


def prune_net(
    net: CaffeNet,
    images: torch.Tensor,
    widths: dict[str, int],
    method: str = "lasso",
    points: int = 10,
    batch: int = 16,
    seed: int = 0,
    shortcut: bool = True,
    filters: dict[str, int] | None = None,
) -> tuple[CaffeNet, list[LayerReport]]:
    """A pruned copy of ``net`` (``net`` untouched) with each pair's conv cut to ``widths``, pair by pair.

    ``shortcut`` (lasso only): refit a conv that feeds a residual sum so that the SUM matches the
    original, making up for what pruning earlier blocks changed in the shortcut.
    ``filters``: conv (a ResNet branch2a) -> channels of its input to keep; a Filter layer in front of
    it keeps them (the shortcut still reads the whole blob), chosen and refitted before its outputs are.
    """
    if method not in ("lasso", "l1"):
        raise ValueError(f"unknown method {method!r} (lasso, l1)")
    pairs = find_pairs(net)
    check_widths(pairs, widths)
    check_filters(net, pairs, filters or {})
    filters = {name: k for name, k in (filters or {}).items() if k < net.layers[name].weight.shape[1]}
    net.eval()
    if filters:
        pruned, fnames = with_full_filters(net, list(filters))
    else:
        pruned, fnames = copy.deepcopy(net), {}
    reports = []

    def batches():
        return (images[s : s + batch] for s in range(0, len(images), batch))

    for i, pair in enumerate(pairs):
        if pair.conv in filters:
            fseed = seed * 100003 + len(pairs) + i  # not a pair's seed: those stay as without filters
            reports.append(_prune_input(net, pruned, pair.conv, fnames[pair.conv], filters[pair.conv], batches(),
                                        method, points, fseed))  # fmt: skip
        k = widths.get(pair.conv, pair.channels)
        if k == pair.channels:
            continue
        b = pruned.layers[pair.next]
        w_old = b.weight.detach().cpu()
        b_old = b.bias.detach().cpu() if b.bias is not None else None
        kk = w_old[0, 0].numel()
        res = find_residual_sum(net, pair.next)
        scale = residual_affine(net, res, len(w_old))[0] if res is not None else None
        sm = sample_points(net, pruned, pair.next, batches(), points, seed * 100003 + i,
                           res.eltwise if res else None, res.main if res else 0)  # fmt: skip
        held, fit = _held_out(sm, seed * 100003 + i)
        columns = k * kk + (b_old is not None)
        if method == "lasso":
            keep, w_new, b_new = _fit(fit, w_old, b_old, k, scale, shortcut)
            _warn_few(pair.next, fit, columns)
        else:
            keep = l1_select(pruned.layers[pair.conv].weight, k)
            w_new, b_new = w_old[:, torch.from_numpy(keep)].reshape(len(w_old), -1), b_old
        err = _error(held, keep, kk, w_new, b_new, scale)
        apply_pair(pruned, pair, keep, w_new, b_new)
        at = res.eltwise if res is not None else pair.next
        reports.append(LayerReport(pair.conv, pair.next, pair.channels, k, err, at, len(fit.x), columns))
        log.info("%s: %d -> %d channels (%s), %s relative error %.4f (held-out points)", pair.conv, pair.channels,
                 k, method, at, err)  # fmt: skip
    return pruned, reports
