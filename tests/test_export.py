"""Deploy exports: BatchNorm/Scale/Dropout folding, the folded mean, ONNX (onnxruntime) and TorchScript files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _prune_nets import REPO, two_blocks_net

from resnet_imagenet.cli import main
from resnet_imagenet.net.export import InputTransform, export, rel_error
from resnet_imagenet.net.fold import fold_input, fold_net
from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import write_blobproto
from resnet_imagenet.proto.text import parse_text
from resnet_imagenet.prune.core import prune_net

ZOO = REPO / "prototxt_like"
ort = pytest.importorskip("onnxruntime", reason="the deploy extra (onnx, onnxruntime) is not installed")
onnx = pytest.importorskip("onnx")


def randomize(net, seed: int = 0):
    """Random weights and BatchNorm statistics (a scale factor != 1, as a trained Caffe net stores)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.layers.values():
            if hasattr(m, "scale_factor"):
                m.scale_factor.fill_(2.5)
                m.mean.copy_(torch.randn(m.mean.shape, generator=g) * 0.5 * 2.5)
                m.variance.copy_((torch.rand(m.variance.shape, generator=g) + 0.5) * 2.5)
            elif hasattr(m, "macs"):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif hasattr(m, "view") and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def tiny():
    return randomize(load_net(ZOO / "resnet_tiny" / "deploy.prototxt"))


def test_fold_removes_batchnorm_and_scale_and_is_exact(tiny):
    folded = fold_net(tiny)
    types = [lp.type for lp in folded.layer_params]
    assert "BatchNorm" not in types and "Scale" not in types
    assert types.count("Convolution") == sum(lp.type == "Convolution" for lp in tiny.layer_params)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want, got = tiny(x, blobs=["fc10", "res2a"]), folded(x, blobs=["fc10", "res2a"])
    for blob in want:
        assert rel_error(got[blob], want[blob]) < 1e-5
    # the original is untouched and still runs its BatchNorms
    assert sum(lp.type == "BatchNorm" for lp in tiny.layer_params) == 16


NOT_IN_PLACE = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "bn" }
layer { name: "sc" type: "Scale" bottom: "bn" top: "sc" scale_param { bias_term: false } }
layer { name: "fc" type: "InnerProduct" bottom: "sc" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "out" dropout_param { dropout_ratio: 0.5 } }
"""


def test_fold_of_renamed_tops_and_dropout_keeps_the_output_name():
    net = randomize(load_net(parse_text(NOT_IN_PLACE, caffe_pb2.NetParameter())))
    folded = fold_net(net)
    assert [(lp.name, list(lp.top)) for lp in folded.layer_params] == [("c", ["sc"]), ("fc", ["out"])]
    assert folded.output_names == net.output_names == ["out"]
    conv, bn, sc = net.layers["c"], net.layers["bn"], net.layers["sc"]
    # by hand: a = gamma / sqrt(var / sf + eps), bias = (b - mean / sf) * a (no Scale bias)
    a = sc.weight / torch.sqrt(bn.variance / 2.5 + 1e-5)
    assert torch.allclose(folded.layers["c"].weight, conv.weight * a[:, None, None, None], rtol=1e-6)
    assert torch.allclose(folded.layers["c"].bias, (conv.bias - bn.mean / 2.5) * a, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        assert rel_error(folded(x)["out"], net(x)["out"]) < 1e-5


def test_batch_statistics_are_refused():
    text = NOT_IN_PLACE.replace('top: "bn" }', 'top: "bn" batch_norm_param { use_global_stats: false } }')
    net = load_net(parse_text(text, caffe_pb2.NetParameter()))
    with pytest.raises(ValueError, match="layer 'bn': BatchNorm uses batch statistics"):
        fold_net(net)


@pytest.mark.parametrize("kind", ["per_channel", "crop_sized", "image_sized"])
def test_folded_mean_is_exact_at_the_padded_borders(tiny, kind):
    mean = {
        "per_channel": torch.tensor([104.0, 117.0, 123.0]),
        "crop_sized": torch.rand(3, 32, 32) * 255,
        "image_sized": torch.rand(3, 40, 36) * 255,  # center-cropped, as Caffe's TEST transform does
    }[kind]
    crop = mean.reshape(3, 1, 1) if kind == "per_channel" else mean if kind == "crop_sized" else mean[:, 4:36, 2:34]
    folded = fold_net(tiny)
    reference = fold_net(tiny)
    fold_input(folded, mean, 0.017)
    pixels = torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad():
        want = reference(((pixels - crop) * 0.017), blobs=["conv1", "fc10"])
        got = folded(pixels, blobs=["conv1", "fc10"])
    for blob in want:
        assert rel_error(got[blob], want[blob]) < 1e-5
    if kind == "per_channel":  # conv1 (3x3 pad 1, then ReLU in place):
        # a per-channel bias alone is right inside and wrong on the border rows
        conv = reference.layers["conv1"]
        w = conv.weight * 0.017
        naive = F.conv2d(pixels, w, conv.bias - (w * crop.reshape(1, 3, 1, 1)).sum((1, 2, 3)), 1, 1).relu()
        assert rel_error(naive[:, :, 1:-1, 1:-1], want["conv1"][:, :, 1:-1, 1:-1]) < 1e-5
        assert rel_error(naive, want["conv1"]) > 1e-2


def _ort(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(tiny, tmp_path):
    out = tmp_path / "tiny.onnx"
    report = export(tiny, "onnx", out, InputTransform(torch.tensor([104.0, 117.0, 123.0]), 0.5))
    assert report.folded_layers == 32 and report.max_rel_error["prob"] < 1e-4
    model = onnx.load(str(out))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Mul" not in ops  # BN and the scale are in the convolutions
    sess = _ort(out)
    assert [i.name for i in sess.get_inputs()] == ["data"] and [o.name for o in sess.get_outputs()] == ["prob"]
    pixels = torch.rand(5, 3, 32, 32) * 255
    (got,) = sess.run(None, {"data": pixels.numpy()})
    with torch.no_grad():
        want = tiny((pixels - torch.tensor([104.0, 117.0, 123.0]).reshape(1, 3, 1, 1)) * 0.5)["prob"]
    assert got.shape == (5, 10, 1, 1) or got.shape == tuple(want.shape)
    assert rel_error(torch.from_numpy(got), want) < 1e-4


def test_torchscript_export_reloads_and_matches(tiny, tmp_path):
    out = tmp_path / "tiny.pt"
    report = export(tiny, "torchscript", out)
    assert report.max_rel_error["prob"] < 1e-4
    loaded = torch.jit.load(str(out))
    x = torch.randn(7, 3, 32, 32)
    with torch.no_grad():
        assert rel_error(loaded(x)[0], tiny(x)["prob"]) < 1e-4


def test_failed_check_writes_nothing_and_keeps_the_old_file(tiny, tmp_path):
    out = tmp_path / "tiny.onnx"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match="differs from the net's.*nothing written"):
        export(tiny, "onnx", out, rtol=-1.0)  # no error is below -1: the check must refuse
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_pruned_net_with_filter_layers_exports(tmp_path):
    net, x, held = two_blocks_net()
    widths = {f"{b}_2{p}": 4 for b in "ab" for p in "ab"}
    pruned, _ = prune_net(net, x, widths, points=10, filters={"a_2a": 4, "b_2a": 5})
    assert sum(lp.type == "Filter" for lp in pruned.layer_params) == 2
    for fmt in ("onnx", "torchscript"):
        report = export(pruned, fmt, tmp_path / f"pruned.{fmt}")
        assert report.output_names == ["b_out"] and report.max_rel_error["b_out"] < 1e-4
    (got,) = _ort(tmp_path / "pruned.onnx").run(None, {"data": held.numpy()})
    with torch.no_grad():
        assert rel_error(torch.from_numpy(got), pruned(held)["b_out"]) < 1e-4


def test_export_command(tiny, tmp_path, capsys):
    weights, mean = tmp_path / "tiny.caffemodel", tmp_path / "mean.binaryproto"
    tiny.save_caffemodel(weights)
    write_blobproto((torch.rand(1, 3, 32, 32) * 255).numpy(), mean)
    model = str(ZOO / "resnet_tiny" / "deploy.prototxt")
    for fmt, extra in (("onnx", ["--fold-mean", str(mean), "--scale", "0.5"]), ("torchscript", [])):
        out = tmp_path / f"tiny.{fmt}"
        argv = ["export", "--model", model, "--weights", str(weights), "--format", fmt, "--out", str(out), *extra]
        assert main(argv) == 0
        assert f"wrote {out} ({fmt}; inputs ['data'], outputs ['prob'], 32 layers folded" in capsys.readouterr().out
    assert main(["export", "--model", model, "--weights", str(weights), "--format", "onnx", "--out",
                 str(tmp_path / "x.onnx"), "--mean-value", "1,2,x"]) != 0  # fmt: skip
    assert "--mean-value '1,2,x'" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_resnet50_onnx_export(tmp_path):
    net = randomize(load_net(ZOO / "resnet_50" / "deploy.prototxt"))
    report = export(net, "onnx", tmp_path / "r50.onnx", InputTransform(torch.tensor([104.0, 117.0, 123.0])))
    assert report.folded_layers == 106 and report.max_rel_error["prob"] < 1e-4
