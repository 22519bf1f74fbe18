"""prune --round N (kept widths in multiples of N) and --residual KEEP (stage-wide residual channel masks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _prune_nets import REPO, TINY
from test_prune import _prune_cli, tiny  # noqa: F401 (the module's fixture: LMDBs, mean, weights)

from resnet_imagenet.net.cost import count_params_macs
from resnet_imagenet.net.net import load_net
from resnet_imagenet.prune.graph import find_pairs
from resnet_imagenet.prune.plan import plan_for_speedup, planned_macs
from resnet_imagenet.prune.residual import apply_residual, find_residual_groups
from resnet_imagenet.tools.prune import load_images

RESNET_50 = REPO / "prototxt_like" / "resnet_50" / "deploy.prototxt"


def _eltwise_channels(net) -> list[list[int]]:
    return [[net.blob_shapes[b][1] for b in lp.bottom] for lp in net.layer_params if lp.type == "Eltwise"]


def test_round_8_plans_multiples_of_8_that_still_reach_the_speedup():
    net = load_net(RESNET_50)
    pairs = find_pairs(net)
    base = planned_macs(net, pairs, {})
    plain = plan_for_speedup(net, pairs, 2.0)[0]
    rounded = plan_for_speedup(net, pairs, 2.0, multiple=8)[0]
    assert any(k % 8 for k in plain.values())  # without rounding some widths are odd sizes
    assert all(k % 8 == 0 for k in rounded.values())
    assert base / planned_macs(net, pairs, rounded) >= 2.0
    # rounding up inside the search: one step of 8 wider everywhere misses the target
    wider = {name: min(k + 8, p.channels) for (name, k), p in zip(rounded.items(), pairs)}
    assert base / planned_macs(net, pairs, wider) < 2.0


def test_prune_round_8_exports_multiples_of_8_counted_in_the_report(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "r8"
    assert _prune_cli(tiny, out, "--speedup", "1.5", "--round", "8", "--points-per-image", "8") == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["round"] == 8 and report["speedup"] >= 1.5
    assert report["layers"] and all(r["channels_after"] % 8 == 0 for r in report["layers"])
    deployed = load_net(out / "deploy.prototxt", weights=out / "r8_pruned.caffemodel")
    convs = [lp.convolution_param.num_output for lp in deployed.layer_params if lp.type == "Convolution"]
    assert all(k % 8 == 0 for k in convs)
    assert count_params_macs(deployed) == (report["params_after"], report["macs_after"])
    net = load_net(TINY, phase="test")
    widths = {r["layer"]: r["channels_after"] for r in report["layers"]}
    assert planned_macs(net, find_pairs(net), widths) == report["macs_after"]


def test_residual_groups_are_the_stages_of_resnet_50():
    groups = find_residual_groups(load_net(RESNET_50))
    assert [g.channels for g in groups] == [256, 512, 1024, 2048]
    assert groups[1].producers == ["res3a_branch1", "res3a_branch2c", "res3b_branch2c", "res3c_branch2c",
                                   "res3d_branch2c"]  # fmt: skip
    assert groups[1].consumers == ["res3b_branch2a", "res3c_branch2a", "res3d_branch2a", "res4a_branch1",
                                   "res4a_branch2a"]  # fmt: skip
    assert groups[3].consumers[-1] == "fc1000"


def _tiny_net(tiny):  # noqa: F811
    net = load_net(TINY, weights=tiny / "w.caffemodel", phase="test")
    x = load_images(net.data_layers[0], tiny / "held_lmdb", tiny / "mean.binaryproto", 8, seed=0)
    return net, x


def test_residual_cut_equals_the_dense_net_with_those_channels_zeroed(tiny):  # noqa: F811
    net, x = _tiny_net(tiny)
    lab = torch.zeros(len(x))
    groups = find_residual_groups(net)
    assert len(groups) == 3
    with torch.no_grad():
        dense = net(x, lab, blobs=["fc10"])["fc10"]
        full = apply_residual(net, [(g, np.arange(g.channels)) for g in groups])  # all kept: the same net
        assert torch.equal(full(x, lab, blobs=["fc10"])["fc10"], dense)
        rng = np.random.default_rng(0)
        keeps = [np.sort(rng.choice(g.channels, g.channels // 2, replace=False)) for g in groups]
        cut = apply_residual(net, list(zip(groups, keeps)))
        assert all(len(set(c)) == 1 for c in _eltwise_channels(cut))
        for g, keep in zip(groups, keeps):
            drop = torch.from_numpy(np.setdiff1d(np.arange(g.channels), keep))
            for name in g.affine:  # a Scale of 0 on a dropped channel: its contribution to every sum is 0
                m = net.layers[name]
                if name.startswith("scale"):
                    m.weight[drop] = 0
                    m.bias[drop] = 0
        torch.testing.assert_close(cut(x, lab, blobs=["fc10"])["fc10"], net(x, lab, blobs=["fc10"])["fc10"])
        assert not torch.allclose(dense, net(x, lab, blobs=["fc10"])["fc10"])  # the zeroing did change it


def test_prune_residual_1_reproduces_the_dense_net_exactly(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "res1"
    assert _prune_cli(tiny, out, "--widths", str(TINY), "--residual", "1.0") == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert [g["channels_after"] for g in report["residual_groups"]] == [64, 128, 256]
    net, x = _tiny_net(tiny)
    deployed = load_net(out / "deploy.prototxt", weights=out / "res1_pruned.caffemodel")
    with torch.no_grad():
        want = net(x, torch.zeros(len(x)), blobs=["fc10"])["fc10"]
        assert torch.equal(deployed(x, blobs=["fc10"])["fc10"], want)


def test_prune_residual_exports_a_net_whose_sums_agree(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "res"
    assert _prune_cli(tiny, out, "--speedup", "1.8", "--residual", "0.5", "--round", "8") == 0
    assert "residual res2a_branch1" in capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    assert [g["channels_after"] for g in report["residual_groups"]] == [32, 64, 128]
    assert report["speedup"] >= 1.8
    deployed = load_net(out / "deploy.prototxt", weights=out / "res_pruned.caffemodel")
    assert count_params_macs(deployed) == (report["params_after"], report["macs_after"])
    assert _eltwise_channels(deployed) == [[32, 32]] * 2 + [[64, 64]] + [[128, 128]]
    assert deployed.layers["fc10"].weight.shape[1] == 128
    net, x = _tiny_net(tiny)
    with torch.no_grad():
        y = deployed(x, blobs=["fc10"])["fc10"]
    assert y.shape == (8, 10) and torch.isfinite(y).all()
    # the plan counted the residual widths: the same MACs as the exported net
    cuts = [(g, g.channels // 2) for g in find_residual_groups(net)]
    widths = {r["layer"]: r["channels_after"] for r in report["layers"]}
    assert planned_macs(net, find_pairs(net), widths, residual=cuts) == report["macs_after"]


def test_residual_and_filter_input_are_refused_together(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "both"
    assert _prune_cli(tiny, out, "--speedup", "1.5", "--residual", "0.5", "--filter-input") == 1
    assert "give one of them" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("residual", [None, 0.75])
def test_round_applies_to_given_widths_too(residual):
    from resnet_imagenet.prune.options import plan_widths, residual_plan

    net = load_net(RESNET_50)
    pairs = find_pairs(net)
    cuts = residual_plan(net, residual, 8)
    keep, _, _ = plan_widths(net, pairs, None, "released", False, 8, cuts)
    assert all(k % 8 == 0 for k in keep.values())
    assert all(k % 8 == 0 for _, k in cuts)
