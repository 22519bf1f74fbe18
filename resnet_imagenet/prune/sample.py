"""Sampling feature points for channel pruning: a conv's input patches and its outputs at random positions.

Only the sampled points are kept (points x Cin x kh x kw floats per layer), never whole feature maps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from resnet_imagenet.net import layers as L
from resnet_imagenet.net.net import CaffeNet


class _Stop(Exception):
    """Raised by a forward hook once the wanted layer has run: the rest of the net is skipped."""


def _capture(
    net: CaffeNet, layer: str, x: torch.Tensor, stop_at: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(input, output) of ``layer`` for the batch ``x``, running the net only up to that layer, and, with
    ``stop_at``, the inputs of that later layer too (read before it runs: an Eltwise may sum in place)."""
    got: dict = {}

    def hook(_m, inp, out):
        got["x"], got["y"] = inp[0], out
        if stop_at is None:
            raise _Stop

    def pre_hook(_m, inp):
        got["later"] = tuple(inp)
        raise _Stop

    hooks = [net.layers[layer].register_forward_hook(hook)]
    if stop_at is not None:
        hooks.append(net.layers[stop_at].register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            net(x)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    if "x" not in got or (stop_at is not None and "later" not in got):
        raise RuntimeError(f"layer '{layer}' did not run")
    return got["x"], got["y"], got.get("later", ())


def _patches(x: torch.Tensor, conv: L.Convolution, n: torch.Tensor, oh: torch.Tensor, ow: torch.Tensor):
    """Input patches (points, Cin * kh * kw) that produce conv outputs at (n, oh, ow), in weight order."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel, conv.stride, conv.pad, conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # N, H, W, C
    rows = oh[:, None] * sh + torch.arange(kh, device=x.device)[None] * dh  # P, kh
    cols = ow[:, None] * sw + torch.arange(kw, device=x.device)[None] * dw  # P, kw
    p = xp[n[:, None, None], rows[:, :, None], cols[:, None, :]]  # P, kh, kw, C
    return p.permute(0, 3, 1, 2).reshape(len(n), -1)


@dataclass
class Samples:
    """x: the conv's input patches in the pruned net; y: its outputs in the original net (same points).

    For a conv whose output (through per-channel layers) is a bottom of an Eltwise SUM, also at the same
    points: ``drift`` = sum over the other bottoms of coeff * (original - pruned), what the pruned net's
    shortcut lost, and ``ref`` = the original Eltwise output; else both None.
    """

    x: torch.Tensor
    y: torch.Tensor
    drift: torch.Tensor | None = None
    ref: torch.Tensor | None = None

    def split(self, idx: torch.Tensor) -> Samples:
        drift, ref = (None, None) if self.drift is None else (self.drift[idx], self.ref[idx])
        return Samples(self.x[idx], self.y[idx], drift, ref)


def sample_points(
    orig: CaffeNet,
    pruned: CaffeNet,
    layer: str,
    batches: Iterable[torch.Tensor],
    points: int,
    seed: int,
    sum_layer: str | None = None,
    main: int = 0,
) -> Samples:
    """Sample ``points`` random output positions per image of conv ``layer`` (see Samples).

    ``sum_layer``: the Eltwise SUM that ``layer``'s output reaches as its bottom number ``main``.
    Only the points are kept, so memory is points x patch size.
    """
    rng = np.random.default_rng(seed)
    conv = pruned.layers[layer]
    coeff = pruned.layers[sum_layer].coeff if sum_layer is not None else []
    xs, ys, drifts, refs = [], [], [], []
    for x in batches:
        _, y, later_o = _capture(orig, layer, x, sum_layer)
        xin, _, later_p = _capture(pruned, layer, x, sum_layer)
        nb, _, h, w = y.shape
        k = min(points, h * w)
        pos = np.concatenate([rng.choice(h * w, k, replace=False) for _ in range(nb)])
        n = torch.arange(nb).repeat_interleave(k).to(x.device)
        pos_t = torch.from_numpy(pos).to(x.device)
        oh, ow = pos_t // w, pos_t % w
        xs.append(_patches(xin, conv, n, oh, ow).cpu())
        ys.append(y[n, :, oh, ow].cpu())
        if sum_layer is not None:
            at = [(c, o[n, :, oh, ow].cpu(), p[n, :, oh, ow].cpu()) for c, o, p in zip(coeff, later_o, later_p)]
            drifts.append(sum(c * (o - p) for i, (c, o, p) in enumerate(at) if i != main))
            refs.append(sum(c * o for c, o, _ in at))
    if not xs:
        raise ValueError("no images to sample features from")
    if sum_layer is None:
        return Samples(torch.cat(xs), torch.cat(ys))
    return Samples(torch.cat(xs), torch.cat(ys), torch.cat(drifts), torch.cat(refs))
