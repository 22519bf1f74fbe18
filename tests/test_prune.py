"""Channel pruning on the tiny zoo ResNet with fixed random weights and a tiny real LMDB."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
import torch
from _prune_nets import REPO, TINY, two_blocks_net

from resnet_imagenet.cli import build_parser, main
from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.net import layers as L
from resnet_imagenet.net.cost import count_params_macs
from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import write_blobproto
from resnet_imagenet.proto.text import parse_text, to_text
from resnet_imagenet.prune.core import prune_net
from resnet_imagenet.prune.export import run as prune_run
from resnet_imagenet.prune.filter import filter_targets
from resnet_imagenet.prune.graph import find_pairs
from resnet_imagenet.prune.plan import RELEASED_FILTERS, plan_for_speedup, planned_macs, read_widths
from resnet_imagenet.tools.prune import load_images


def _write_lmdb(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(n):
            img = cv2.GaussianBlur((rng.random((36, 36, 3)) * 255).astype(np.uint8), (5, 5), 0)
            txn.put(b"%08d_img%d" % (i, i), encode_datum(img, i % 10))
    env.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """LMDBs (train, held-out, empty), a mean file and fixed random weights for resnet_tiny."""
    d = tmp_path_factory.mktemp("prune")
    train = _write_lmdb(d / "train_lmdb", 48, 0)
    _write_lmdb(d / "held_lmdb", 16, 1)
    _write_lmdb(d / "empty_lmdb", 0, 2)
    write_blobproto(np.full((1, 3, 32, 32), 120.0, np.float32), d / "mean.binaryproto")
    torch.manual_seed(0)
    net = load_net(TINY, phase="test")
    x = load_images(net.data_layers[0], train, d / "mean.binaryproto", 48, seed=5)
    with torch.no_grad():
        for name, m in net.layers.items():
            if name.startswith("scale"):  # channels of unequal importance, so selection matters
                m.weight.uniform_(0.2, 2.0)
                m.bias.uniform_(-0.5, 0.5)
        net.train()  # one TRAIN pass gives every BatchNorm this batch's statistics (scale_factor 1)
        net(x, torch.zeros(len(x)))
    net.save_caffemodel(d / "w.caffemodel")
    return d


def _prune_cli(tiny: Path, out: Path, *extra: str) -> int:
    args = ["prune", "--model", str(TINY), "--weights", str(tiny / "w.caffemodel"), "--data", str(tiny / "train_lmdb"),
            "--mean", str(tiny / "mean.binaryproto"), "--out", str(out), "--images", "24", *extra]  # fmt: skip
    return main(args)


def test_lasso_with_least_squares_beats_l1_at_the_same_widths(tiny):
    net = load_net(TINY, weights=tiny / "w.caffemodel", phase="test")
    mean = tiny / "mean.binaryproto"
    x = load_images(net.data_layers[0], tiny / "train_lmdb", mean, 48, seed=0)
    held = load_images(net.data_layers[0], tiny / "held_lmdb", mean, 16, seed=0)
    widths = plan_for_speedup(net, find_pairs(net), 1.6)[0]
    results = {}
    for method in ("lasso", "l1"):
        pruned, reports = prune_net(net, x, widths, method=method, points=16)
        assert [r.channels_after for r in reports] == list(widths.values())
        with torch.no_grad():
            lab = torch.zeros(len(held))
            want, got = net(held, lab, blobs=["fc10"])["fc10"], pruned(held, lab, blobs=["fc10"])["fc10"]
        results[method] = (
            np.mean([r.rel_error for r in reports]),
            float((got - want).norm() / want.norm()),  # held-out images: not the sampled ones
        )
    print(results)
    (err_lasso, out_lasso), (err_l1, out_l1) = results["lasso"], results["l1"]
    assert err_lasso < err_l1
    assert out_lasso < out_l1


def test_prune_command_writes_a_loadable_net_equal_to_the_in_memory_one(tiny, tmp_path, capsys):
    out = tmp_path / "resnet_tiny_2x"
    assert _prune_cli(tiny, out, "--speedup", "1.5", "--points-per-image", "8") == 0
    assert "fewer multiply-adds" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["deploy.prototxt", "train_val.prototxt", "resnet_tiny_2x_pruned.caffemodel",
                            "resnet_tiny_2x_solver.prototxt", "prune_report.json"])  # fmt: skip
    report = json.loads((out / "prune_report.json").read_text())
    assert report["speedup"] >= 1.5 and report["images"] == 24
    solver = (out / "resnet_tiny_2x_solver.prototxt").read_text()
    assert f'net: "{out}/train_val.prototxt"' in solver and 'snapshot_prefix: "snapshots/resnet_tiny_2x"' in solver
    assert "base_lr: 0.01\n" in solver  # the zoo's tiny solver's 0.1 / 10
    assert solver.count("test_iter:") == 1 and "test_iter: 10\n" in solver  # the tiny solver's, not merged twice

    deployed = load_net(out / "deploy.prototxt", weights=out / "resnet_tiny_2x_pruned.caffemodel")
    assert count_params_macs(deployed) == (report["params_after"], report["macs_after"])
    assert deployed.layers["res2a_branch2a"].weight.shape[0] == report["layers"][0]["channels_after"]
    # The same pruning in memory (same images, seed and points) gives the same outputs as the files.
    net = load_net(TINY, weights=tiny / "w.caffemodel", phase="test")
    x = load_images(net.data_layers[0], tiny / "train_lmdb", tiny / "mean.binaryproto", 24, seed=0)
    widths = {r["layer"]: r["channels_after"] for r in report["layers"]}
    pruned, _ = prune_net(net, x, widths, points=8)
    held = load_images(net.data_layers[0], tiny / "held_lmdb", tiny / "mean.binaryproto", 16, seed=0)
    with torch.no_grad():
        want = pruned(held, torch.zeros(16), blobs=["fc10"])["fc10"]
        got = deployed(held, blobs=["fc10"])["fc10"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    trained = load_net(out / "train_val.prototxt", weights=out / "resnet_tiny_2x_pruned.caffemodel", phase="train")
    assert trained.layers["res4a_branch2c"].weight.shape[1] == widths["res4a_branch2b"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("speedup", "cannot be reached"),
        ("speedup1", "--speedup 1: must be above 1"),
        ("speedup0.5", "--speedup 0.5: must be above 1"),
        ("residual", "--residual 1.5: the residual channels' keep ratio must be in (0, 1]"),
        ("round", "--round 0: must be a positive number of channels"),
        ("weights", "shape mismatch"),
        ("empty", "no records"),
        ("widths", "width 99 outside 1..16"),
        ("filter", "has no Filter layer in front of a convolution"),
    ],
)
def test_bad_input_fails_before_writing(tiny, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "prune_report.json").write_text("old")  # an earlier prune's folder: --force may replace it
    extra = ["--speedup", "1.5", "--force"]
    weights = tiny / "w.caffemodel"
    data = tiny / "train_lmdb"
    if case == "speedup":
        extra[1] = "50"
    elif case.startswith("speedup"):  # (#13 case 12) R <= 1 would write an unpruned "pruned" net
        extra[1] = case[len("speedup") :]
    elif case in ("residual", "round"):
        extra += ["--residual", "1.5"] if case == "residual" else ["--round", "0"]
    elif case == "empty":
        data = tiny / "empty_lmdb"
    elif case == "filter":  # --filter-input with a widths prototxt that has no Filter layers
        extra = ["--widths", str(TINY), "--filter-input", "--force"]
    else:
        other = parse_text(TINY.read_text(), caffe_pb2.NetParameter())
        conv = next(lp for lp in other.layer if lp.name == "res2a_branch2a").convolution_param
        if case == "weights":  # a caffemodel of another width
            conv.num_output = 8
            load_net(other).save_caffemodel(tmp_path / "other.caffemodel")
            weights = tmp_path / "other.caffemodel"
        else:  # widths wider than the net
            conv.num_output = 99
            (tmp_path / "w.prototxt").write_text(to_text(other))
            extra = ["--widths", str(tmp_path / "w.prototxt"), "--force"]
    args = ["prune", "--model", str(TINY), "--weights", str(weights), "--data", str(data),
            "--mean", str(tiny / "mean.binaryproto"), "--out", str(out), "--images", "8", *extra]  # fmt: skip
    assert main(args) == 1
    assert message in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["prune_report.json"]  # untouched, no temporary left beside it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_prune_flags_default_to_runs_signature_and_device_is_a_hidden_alias(capsys):
    parser = build_parser("prune")
    base = ["prune", "--model", "m", "--weights", "w", "--data", "d", "--out", "o", "--speedup", "2"]
    args = parser.parse_args(base)
    params = inspect.signature(prune_run).parameters
    for name in ("method", "images", "points", "batch", "seed"):
        assert getattr(args, name) == params[name].default
    assert (args.gpu, args.device) == (None, None)  # the CPU
    assert parser.parse_args([*base, "--device", "cuda:1"]).device == "cuda:1"  # old scripts still parse
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--help"])
    help_text = capsys.readouterr().out
    assert "--gpu" in help_text and "--device" not in help_text and "(default 500)" in help_text


@pytest.fixture(scope="module")
def two_blocks():
    """(net, fitting inputs, held-out inputs) of the fixed 2-block bottleneck net."""
    return two_blocks_net()


def test_shortcut_fix_lowers_the_block_output_error(two_blocks):
    net, x, held = two_blocks
    widths = {f"{b}_2{p}": 3 for b in "ab" for p in "ab"}
    err, reported = {}, {}
    for shortcut in (True, False):
        pruned, reports = prune_net(net, x, widths, points=10, shortcut=shortcut)
        with torch.no_grad():
            want, got = net(held, blobs=["b"])["b"], pruned(held, blobs=["b"])["b"]
        err[shortcut] = float((got - want).norm() / want.norm())  # held-out inputs, after the Eltwise
        reported[shortcut] = {r.layer: r.rel_error for r in reports}
    assert [r.measured_at for r in reports] == ["a_2b", "a", "b_2b", "b"]
    assert err[True] < 0.95 * err[False]  # seen: 0.64 vs 0.72
    assert reported[True]["b_2b"] < reported[False]["b_2b"]  # the report sees it too (block b's sum)


def test_error_is_measured_on_held_out_points_and_few_points_warn(two_blocks, caplog):
    net, x, _ = two_blocks
    with caplog.at_level("WARNING", logger="resnet_imagenet.prune.core"):
        _, reports = prune_net(net, x[:16], {"a_2a": 3, "a_2b": 3}, points=4)
    assert [(r.fit_points, r.columns) for r in reports] == [(52, 27), (52, 3)]  # 64 points, 12 held out
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith("a_2b: 52 fitting points for 27")


def test_filter_input_prunes_each_block_input_through_a_filter_layer(two_blocks):
    net, x, held = two_blocks
    pairs = find_pairs(net)
    assert filter_targets(net, pairs) == {"a_2a": 8, "b_2a": 8}  # the block inputs; a_2b, b_2b are paired
    widths, filters = {f"{b}_2{p}": 4 for b in "ab" for p in "ab"}, {"a_2a": 4, "b_2a": 5}
    out, macs = {}, {}
    for method in ("lasso", "l1"):
        pruned, reports = prune_net(net, x, widths, points=10, method=method, filters=filters)
        with torch.no_grad():
            want, got = net(held, blobs=["b"])["b"], pruned(held, blobs=["b"])["b"]
        out[method] = float((got - want).norm() / want.norm())
        macs[method] = count_params_macs(pruned)[1]
    assert [(r.layer, r.next, r.channels_before, r.channels_after) for r in reports] == [
        ("data_Filter", "a_2a", 8, 4), ("a_2a", "a_2b", 8, 4), ("a_2b", "a_2c", 8, 4),
        ("a_out_Filter", "b_2a", 8, 5), ("b_2a", "b_2b", 8, 4), ("b_2b", "b_2c", 8, 4),
    ]  # fmt: skip
    for name, conv in (("data_Filter", "a_2a"), ("a_out_Filter", "b_2a")):
        f, lp = pruned.layers[name], pruned.layer_params_by_name(name)
        assert int(f.selector.count_nonzero()) == f.num_output == lp.filter_param.num_output == filters[conv]
        assert list(pruned.layer_params_by_name(conv).bottom) == [name]
        assert pruned.layers[conv].weight.shape[1] == filters[conv]
    assert list(pruned.layer_params_by_name("a").bottom) == ["data", "a_2c"]  # the shortcut reads all channels
    assert list(pruned.layer_params_by_name("b").bottom) == ["a_out", "b_2c"]
    # Branch2a's MACs shrink with its input; the MAC count plans it so.
    plain = count_params_macs(prune_net(net, x, widths, points=10)[0])[1]
    assert macs["lasso"] == planned_macs(net, pairs, widths, filters) < plain
    assert planned_macs(net, pairs, widths) == plain
    print(out)
    assert out["lasso"] < out["l1"]  # the LASSO choice of input channels, refitted, beats the L1 norms


def test_prune_command_with_filter_input_exports_filter_layers(tiny, tmp_path):
    out = tmp_path / "resnet_tiny_fi"
    assert _prune_cli(tiny, out, "--speedup", "1.5", "--points-per-image", "8", "--filter-input") == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["filter_input"] and report["speedup"] >= 1.5
    tv = parse_text((out / "train_val.prototxt").read_text(), caffe_pb2.NetParameter())
    blocks = ["res2a", "res2b", "res3a", "res4a"]
    inputs = dict(zip(blocks, ["pool1", "res2a", "res2b", "res3a"]))  # each block's input blob
    layers = {lp.name: lp for lp in tv.layer}
    filters = {}
    for b in blocks:
        f = layers[f"{inputs[b]}_Filter"]
        assert (f.type, list(f.bottom), list(f.top)) == ("Filter", [inputs[b]], [f.name])
        assert (f.param[0].lr_mult, f.param[0].decay_mult) == (0, 0)
        assert list(layers[f"{b}_branch2a"].bottom) == [f.name]
        shortcut = layers.get(f"{b}_branch1", layers[b])  # branch1, or the identity into the Eltwise
        assert inputs[b] in shortcut.bottom  # reads the whole block input
        filters[f"{b}_branch2a"] = f.filter_param.num_output
    assert read_widths(out / "deploy.prototxt")[1] == filters

    weights = out / "resnet_tiny_fi_pruned.caffemodel"
    deployed = load_net(out / "deploy.prototxt", weights=weights)
    for conv, k in filters.items():
        name = deployed.layer_params_by_name(conv).bottom[0]
        assert int(deployed.layers[name].selector.count_nonzero()) == k  # the caffemodel's selector keeps k
        assert deployed.layers[conv].weight.shape[1] == deployed.blob_shapes[name][1] == k
    assert count_params_macs(deployed) == (report["params_after"], report["macs_after"])
    # The same pruning in memory gives the same outputs as the files.
    net = load_net(TINY, weights=tiny / "w.caffemodel", phase="test")
    pairs = find_pairs(net)
    x = load_images(net.data_layers[0], tiny / "train_lmdb", tiny / "mean.binaryproto", 24, seed=0)
    widths = {r["layer"]: r["channels_after"] for r in report["layers"] if "Filter" not in r["layer"]}
    assert (widths, filters) == plan_for_speedup(net, pairs, 1.5, filter_targets(net, pairs))
    pruned, _ = prune_net(net, x, widths, points=8, filters=filters)
    held = load_images(net.data_layers[0], tiny / "held_lmdb", tiny / "mean.binaryproto", 16, seed=0)
    with torch.no_grad():
        want = pruned(held, torch.zeros(16), blobs=["fc10"])["fc10"]
        got = deployed(held, blobs=["fc10"])["fc10"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for conv in filters:  # the same channels kept
        name = pruned.layer_params_by_name(conv).bottom[0]
        torch.testing.assert_close(deployed.layers[name].selector, pruned.layers[name].selector)
    # At these widths the Filters cut more multiply-adds than the widths alone (so the ratio keeps more).
    assert report["macs_after"] < planned_macs(net, pairs, widths)
    assert all(w >= v for w, v in zip(widths.values(), plan_for_speedup(net, pairs, 1.5)[0].values()))
    load_net(out / "train_val.prototxt", weights=weights, phase="train")


@pytest.mark.slow
def test_released_widths_with_filter_input_give_the_released_resnet_50(tmp_path):
    """ResNet-50 (random weights, 2 tiny-sampled images) pruned to the released widths and Filters: 2.60 GMACs."""
    zoo = REPO / "prototxt_like" / "resnet_50"
    env = lmdb.open(str(tmp_path / "lmdb"), map_size=1 << 26)
    rng = np.random.default_rng(0)
    with env.begin(write=True) as txn:
        for i in range(2):
            img = cv2.GaussianBlur((rng.random((224, 224, 3)) * 255).astype(np.uint8), (7, 7), 0)
            txn.put(b"%08d" % i, encode_datum(img, i))
    env.close()
    write_blobproto(np.full((1, 3, 224, 224), 100.0, np.float32), tmp_path / "mean.binaryproto")
    torch.manual_seed(0)
    net = load_net(zoo / "train_val.prototxt", phase="test", input_shapes={"data": (1, 3, 224, 224), "label": (1,)})
    with torch.no_grad():
        for m in net.layers.values():
            if isinstance(m, L.Convolution):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, L.BatchNorm):  # unit statistics (a fresh one has scale_factor 0)
                m.variance.fill_(1.0)
                m.scale_factor.fill_(1.0)
    net.save_caffemodel(tmp_path / "w.caffemodel")
    out = tmp_path / "resnet_50_2x"
    args = ["prune", "--model", str(zoo / "train_val.prototxt"), "--weights", str(tmp_path / "w.caffemodel"),
            "--data", str(tmp_path / "lmdb"), "--mean", str(tmp_path / "mean.binaryproto"), "--widths", "released",
            "--filter-input", "--images", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert round(report["macs_before"] / 1e9, 2) == 3.86 and round(report["macs_after"] / 1e9, 2) == 2.60
    assert report["macs_after"] == report["released"]["macs_with_input_filters"]
    deployed = load_net(out / "deploy.prototxt", weights=out / "resnet_50_2x_pruned.caffemodel")
    assert count_params_macs(deployed)[1] == report["macs_after"]
    _, filters = read_widths(out / "train_val.prototxt")
    assert filters == RELEASED_FILTERS
    for conv, k in filters.items():
        name = deployed.layer_params_by_name(conv).bottom[0]
        assert int(deployed.layers[name].selector.count_nonzero()) == k
