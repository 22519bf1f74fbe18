"""The prune command's width options resolved into widths: --speedup or --widths, --round, --residual.

Every check here runs before any image is read or any file written.
"""

from __future__ import annotations

from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.prune.filter import check_filters, filter_targets
from resnet_imagenet.prune.graph import PrunePair
from resnet_imagenet.prune.plan import (
    RELEASED_FILTERS,
    RELEASED_WIDTHS,
    check_widths,
    keep_width,
    plan_for_speedup,
    read_widths,
    round_widths,
)
from resnet_imagenet.prune.residual import ResidualGroup, find_residual_groups


def residual_plan(net: CaffeNet, residual: float | None, multiple: int) -> list[tuple[ResidualGroup, int]]:
    """(group, width) of every residual group at keep ratio ``residual`` (none when it is None)."""
    if residual is None:
        return []
    if not 0 < residual <= 1:
        raise ValueError(f"--residual {residual:g}: the residual channels' keep ratio must be in (0, 1]")
    groups = find_residual_groups(net)
    if not groups:
        raise ValueError("--residual: the net has no residual sums whose channels can be pruned")
    return [(g, keep_width(residual, g.channels, multiple)) for g in groups]


def plan_widths(
    net: CaffeNet,
    pairs: list[PrunePair],
    speedup: float | None,
    widths: str | None,
    filter_input: bool,
    multiple: int = 1,
    residual: list[tuple[ResidualGroup, int]] | None = None,
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(widths of the pair convs, the input Filter widths --widths names, the input Filters to prune);
    --round ``multiple`` rounds every width up (with --speedup inside the search, so the target holds)."""
    filters: dict[str, int] = {}  # the input Filter widths that --widths names (released or its prototxt's)
    applied: dict[str, int] = {}  # the input Filters pruned with --filter-input
    if speedup is not None:
        if speedup <= 1:
            raise ValueError(f"--speedup {speedup:g}: must be above 1 (at 1 or below nothing is pruned)")
        targets = filter_targets(net, pairs) if filter_input else None
        keep, applied = plan_for_speedup(net, pairs, speedup, targets, multiple, residual)
    elif widths == "released":
        keep, filters = dict(RELEASED_WIDTHS), dict(RELEASED_FILTERS)
    else:
        all_widths, filters = read_widths(widths)
        keep = {p.conv: all_widths[p.conv] for p in pairs if p.conv in all_widths}
        if not keep:
            raise ValueError(f"{widths}: names none of this net's prunable convolutions")
    check_widths(pairs, keep)
    if filter_input and widths is not None:
        if not filters:
            raise ValueError(f"--filter-input: {widths} has no Filter layer in front of a convolution")
        applied = filters
    if widths is not None and multiple > 1:
        keep = round_widths(keep, {p.conv: p.channels for p in pairs}, multiple)
        applied = round_widths(applied, filter_targets(net, pairs), multiple)
    check_filters(net, pairs, applied)
    return keep, filters, applied
