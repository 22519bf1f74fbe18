"""Channel pruning (He, Zhang & Sun, ICCV 2017): LASSO channel selection + least-squares reconstruction.

For each prunable pair (prune/graph.py) in network order we sample points (random output positions of
B) from a batch of images, X = B's input patches in the PRUNED net so far and Y = B's output in the
ORIGINAL net (prune/sample.py), pick B's input channels by LASSO (penalty bisected until exactly k
channels survive), refit B's weights by least squares so that B(X_kept) ~ Y (prune/fit.py), and drop
the other channels from A and its BatchNorm/Scale (prune/surgery.py).
The LASSO runs on the Gram matrix Z^T Z (channels x channels), computed from X^T X and W^T W blocks,
never on the points x outputs x channels tensor Z.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.prune.filter import check_filters
from resnet_imagenet.prune.fit import held_out_error, l1_fit, lasso_fit, split_held_out
from resnet_imagenet.prune.graph import PrunePair, find_pairs, find_residual_sum, residual_affine
from resnet_imagenet.prune.plan import check_widths
from resnet_imagenet.prune.sample import Samples, sample_points
from resnet_imagenet.prune.surgery import apply_filter, apply_pair, with_full_filters

log = logging.getLogger(__name__)

Batches = Callable[[], Iterator[torch.Tensor]]  # a fresh pass over the sampled images, batch by batch


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


def _weights(net: CaffeNet, conv: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    c = net.layers[conv]
    return c.weight.detach().cpu(), c.bias.detach().cpu() if c.bias is not None else None


def _warn_few(layer: str, fit: Samples, columns: int) -> None:
    if len(fit.x) < 2 * columns:
        log.warning(
            "%s: %d fitting points for %d least-squares columns (< 2x): the fit may interpolate;"
            " raise --images or --points-per-image",
            layer,
            len(fit.x),
            columns,
        )


@dataclass
class _Run:
    """One prune_net call: the original net, the copy being pruned, the sampled images and the options."""

    net: CaffeNet
    pruned: CaffeNet
    batches: Batches
    method: str
    points: int
    shortcut: bool

    def prune_input(self, conv: str, fname: str, k: int, seed: int) -> LayerReport:
        """Narrow the Filter ``fname`` in front of ``conv`` to ``k`` of its input channels: LASSO on conv's
        input (pruned net) against its output (original net), then conv refitted by least squares."""
        w_old, b_old = _weights(self.pruned, conv)
        kk, cin = w_old[0, 0].numel(), w_old.shape[1]
        sm = sample_points(self.net, self.pruned, conv, self.batches(), self.points, seed)
        held, fit = split_held_out(sm, seed)
        columns = k * kk + (b_old is not None)
        if self.method == "lasso":
            keep, w_new, b_new = lasso_fit(fit, w_old, b_old, k, None, False)
            _warn_few(conv, fit, columns)
        else:  # the baseline: the input channels with the largest L1 norm of conv's weights, no refit
            keep, w_new, b_new = l1_fit(w_old.transpose(0, 1), w_old, b_old, k)
        err = held_out_error(held, keep, kk, w_new, b_new, None)
        apply_filter(self.pruned, fname, conv, keep, w_new, b_new)
        log.info(
            "%s: input %d -> %d channels (%s), %s relative error %.4f (held-out points)",
            *(fname, cin, k, self.method, conv, err),
        )
        return LayerReport(fname, conv, cin, k, err, conv, len(fit.x), columns)

    def prune_pair(self, pair: PrunePair, k: int, seed: int) -> LayerReport:
        """Cut ``pair.conv`` of the pruned net to ``k`` channels and refit ``pair.next``."""
        w_old, b_old = _weights(self.pruned, pair.next)
        kk = w_old[0, 0].numel()
        res = find_residual_sum(self.net, pair.next)
        scale = residual_affine(self.net, res, len(w_old))[0] if res is not None else None
        at_sum = (res.eltwise, res.main) if res is not None else (None, 0)
        sm = sample_points(self.net, self.pruned, pair.next, self.batches(), self.points, seed, *at_sum)
        held, fit = split_held_out(sm, seed)
        columns = k * kk + (b_old is not None)
        if self.method == "lasso":
            keep, w_new, b_new = lasso_fit(fit, w_old, b_old, k, scale, self.shortcut)
            _warn_few(pair.next, fit, columns)
        else:
            keep, w_new, b_new = l1_fit(self.pruned.layers[pair.conv].weight, w_old, b_old, k)
        err = held_out_error(held, keep, kk, w_new, b_new, scale)
        apply_pair(self.pruned, pair, keep, w_new, b_new)
        at = res.eltwise if res is not None else pair.next
        log.info(
            "%s: %d -> %d channels (%s), %s relative error %.4f (held-out points)",
            *(pair.conv, pair.channels, k, self.method, at, err),
        )
        return LayerReport(pair.conv, pair.next, pair.channels, k, err, at, len(fit.x), columns)


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

    def batches() -> Iterator[torch.Tensor]:
        return (images[s : s + batch] for s in range(0, len(images), batch))

    run, reports = _Run(net, pruned, batches, method, points, shortcut), []
    for i, pair in enumerate(pairs):
        if pair.conv in filters:
            fseed = seed * 100003 + len(pairs) + i  # not a pair's seed: those stay as without filters
            reports.append(run.prune_input(pair.conv, fnames[pair.conv], filters[pair.conv], fseed))
        k = widths.get(pair.conv, pair.channels)
        if k != pair.channels:
            reports.append(run.prune_pair(pair, k, seed * 100003 + i))
    return pruned, reports
