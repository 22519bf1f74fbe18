"""prune/plan.py: widths for a speed-up, MAC planning, the released widths."""

from __future__ import annotations

import pytest
from _prune_nets import REPO, TINY

from resnet_imagenet.net.cost import count_params_macs
from resnet_imagenet.net.net import load_net
from resnet_imagenet.prune.graph import find_pairs
from resnet_imagenet.prune.plan import RELEASED_FILTERS, RELEASED_WIDTHS, plan_for_speedup, planned_macs, read_widths


def test_speedup_widths_reach_the_target_and_unreachable_ones_fail():
    net = load_net(TINY, phase="test")
    pairs = find_pairs(net)
    base = planned_macs(net, pairs, {})
    assert base == count_params_macs(net)[1]
    for r in (1.2, 1.5, 2.0):
        w = plan_for_speedup(net, pairs, r)[0]
        assert base / planned_macs(net, pairs, w) >= r
        wider = {k: min(v + 1, p.channels) for (k, v), p in zip(w.items(), pairs)}  # one more channel each: too slow
        assert base / planned_macs(net, pairs, wider) < r
    with pytest.raises(ValueError, match="cannot be reached"):
        plan_for_speedup(net, pairs, 10.0)


def test_released_widths_match_the_published_model(reference_dir):
    widths, filters = read_widths(reference_dir / "channel-pruning" / "temp" / "resnet-50-cp.prototxt")
    assert {k: v for k, v in widths.items() if "_branch2a" in k or "_branch2b" in k} == RELEASED_WIDTHS
    assert filters == RELEASED_FILTERS
    net = load_net(REPO / "prototxt_like" / "resnet_50" / "deploy.prototxt")
    pairs = find_pairs(net)
    assert len(pairs) == 32
    base = planned_macs(net, pairs, {})
    released = planned_macs(net, pairs, RELEASED_WIDTHS, RELEASED_FILTERS)
    assert round(base / 1e9, 2) == 3.86 and round(released / 1e9, 2) == 2.60  # "2X" is 1.48x by plain MACs
    assert base / planned_macs(net, pairs, plan_for_speedup(net, pairs, 2.0)[0]) >= 2.0
