"""Caffe's command lines: single-dash flags for every tool, ``test``'s output lines, device_query."""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from resnet_imagenet import cli
from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.tools import COMMANDS
from resnet_imagenet.train.setup import load_data_net

# Two heads, as GoogLeNet's train_val: outputs are printed in name order (Caffe's std::set of output blobs).
NET = """
name: "two-heads"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.01 } data_param { source: "val_lmdb" batch_size: 3 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.01 mirror: true } data_param { source: "val_lmdb" batch_size: 2 } }
layer { name: "fc_b" type: "InnerProduct" bottom: "data" top: "fc_b"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "fc_a" type: "InnerProduct" bottom: "data" top: "fc_a"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "b/loss" type: "SoftmaxWithLoss" bottom: "fc_b" bottom: "label" top: "b/loss" loss_weight: 0.3 }
layer { name: "a/loss" type: "SoftmaxWithLoss" bottom: "fc_a" bottom: "label" top: "a/loss" }
layer { name: "a/top-2" type: "Accuracy" bottom: "fc_a" bottom: "label" top: "a/top-2"
  accuracy_param { top_k: 2 ignore_label: 1 } include { phase: TEST } }
"""
N, SIZE, CLASSES = 7, 4, 4


@pytest.fixture
def project(tmp_path, monkeypatch):
    """cwd with a 7-image raw LMDB, the net, random weights and a solver; returns (images, labels)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, size=N)
    env = lmdb.open(str(tmp_path / "val_lmdb"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i, (img, lab) in enumerate(zip(images, labels)):
            txn.put(f"{i:08d}".encode(), encode_datum(img, int(lab)))
    env.close()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(NET)
    net = load_data_net(tmp_path / "net.prototxt", phase="test")
    with torch.no_grad():
        for m in net.layers.values():
            for t in m.blobs():
                t.copy_(torch.from_numpy(rng.normal(0, 0.5, size=tuple(t.shape)).astype(np.float32)))
    net.save_caffemodel(tmp_path / "w.caffemodel")
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 1 snapshot_prefix: "snap/t" random_seed: 1'
    )
    return images, labels, net


def _numpy_outputs(images, labels, net, idx) -> dict[str, float]:
    x = images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1).astype(np.float64) * 0.01
    lab = labels[idx]
    out = {}
    for head in ("a", "b"):
        w, b = (t.detach().double().numpy() for t in net.layers[f"fc_{head}"].blobs())
        z = x @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[f"{head}/loss"] = float(np.mean(-np.log(p[np.arange(len(idx)), lab])))
        if head == "a":
            valid = lab != 1
            rank = (z >= z[np.arange(len(idx)), lab][:, None]).sum(1) - 1
            out["a/top-2"] = float(np.sum((rank < 2) & valid) / valid.sum())
    return out


def test_test_prints_what_caffe_test_prints(project, capsys) -> None:
    images, labels, net = project
    assert cli.main(["test", "-model", "net.prototxt", "-weights", "w.caffemodel", "-iterations", "2",
                     "-workers=0"]) == 0  # fmt: skip
    batches = [_numpy_outputs(images, labels, net, np.arange(3 * i, 3 * i + 3)) for i in range(2)]
    mean = {k: (batches[0][k] + batches[1][k]) / 2 for k in batches[0]}
    loss = mean["a/loss"] + 0.3 * mean["b/loss"]
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert [line.split(" = ")[0] for line in out] == ["Loss: " + out[0][6:], "a/loss", "a/top-2", "b/loss"]
    assert float(out[0].removeprefix("Loss: ")) == pytest.approx(loss, rel=1e-5)
    assert float(out[1].split(" = ")[1].split(" (")[0]) == pytest.approx(mean["a/loss"], rel=1e-5)
    assert out[1].endswith(f" (* 1 = {float(out[1].split(' = ')[1].split(' (')[0]):.6g} loss)")
    assert float(out[2].split(" = ")[1]) == pytest.approx(mean["a/top-2"], abs=1e-6)
    bl = float(out[3].split(" = ")[1].split(" (")[0])
    assert bl == pytest.approx(mean["b/loss"], rel=1e-5) and out[3].endswith(f" (* 0.3 = {0.3 * bl:.6g} loss)")
    logged = [line.split("] ", 1)[1] for line in captured.err.splitlines() if "] Batch " in line]  # glog lines
    assert [m.split(" = ")[0] for m in logged] == [f"Batch {i}, {n}" for i in (0, 1) for n in ("a/loss", "a/top-2",
                                                                                             "b/loss")]  # fmt: skip
    assert float(logged[4].split(" = ")[1]) == pytest.approx(batches[1]["a/top-2"], abs=1e-6)


def test_ten_crop_needs_accuracy_or_loss_outputs(project, capsys) -> None:
    text = NET.replace("transform_param { scale: 0.01 }", "transform_param { scale: 0.01 crop_size: 4 }")
    text += 'layer { name: "p" type: "Softmax" bottom: "fc_b" top: "prob" include { phase: TEST } }'
    Path("ten.prototxt").write_text(text)
    assert cli.main(["test", "-model", "ten.prototxt", "-weights", "w.caffemodel", "-ten_crop", "-workers", "0"]) == 1
    assert "output 'prob' is from a Softmax layer" in capsys.readouterr().err


def test_single_dash_flags_for_every_tool() -> None:
    for name in COMMANDS:
        parser = cli.build_parser(name)
        options = cli._long_options(parser, name)
        assert options, name
        for opt, action in options.items():
            if opt in ("--help",):
                continue
            caffe = "-" + opt[2:].replace("-", "_")
            assert cli.caffe_flags([name, caffe, "v"], name, options) == [name, opt, "v"], (name, opt)
            assert cli.caffe_flags([name, f"-{opt[2:]}=v"], name, options) == [name, f"{opt}=v"]
            if action.nargs == 0:  # gflags' -flag=true / -flag=false on a switch
                assert cli.caffe_flags([name, f"-{opt[2:]}=true"], name, options) == [name, opt]
                assert cli.caffe_flags([name, f"-{opt[2:]}=false"], name, options) == [name]
    # short options, negative numbers, values and tokens before the command are left alone
    options = cli._long_options(cli.build_parser("test"), "test")
    argv = ["-v", "test", "-h", "-iterations", "-1", "-nosuch", "--model", "-model.prototxt"]
    assert cli.caffe_flags(argv, "test", options) == ["-v", "test", "-h", "--iterations", "-1", "-nosuch", "--model",
                                                      "-model.prototxt"]  # fmt: skip


def test_caffe_spelling_of_train_time_and_compute_image_mean(project, capsys) -> None:
    assert cli.main(["train", "-solver", "solver.prototxt", "-weights", "w.caffemodel", "-gpu", "cpu",
                     "-workers", "0", "-sigint_effect", "stop"]) == 0  # fmt: skip
    assert sorted(p.name for p in Path("snap").iterdir()) == [
        "t_iter_1.caffemodel",
        "t_iter_1.solverstate",
        "t_iter_1.solverstate.resnet_imagenet.pt",
    ]
    assert cli.main(["time", "-model", "net.prototxt", "-iterations=1", "-phase", "TEST", "-batch", "2"]) == 0
    assert cli.main(["compute_image_mean", "-backend", "lmdb", "val_lmdb", "mean.binaryproto", "-no-progress"]) == 0
    assert Path("mean.binaryproto").is_file()


def test_device_query(capsys) -> None:
    assert cli.main(["device_query"]) == 0
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert "Querying GPU 0" in out and f"Name:                          {torch.cuda.get_device_name(0)}" in out
        assert cli.main(["device_query", "-gpu", "0"]) == 0
    else:
        assert out.startswith("No GPU found")
    assert cli.main(["device_query", "-gpu", "99"]) == (1 if torch.cuda.is_available() else 0)


def test_summary_reads_the_first_record(project, capsys) -> None:
    assert cli.main(["summary", "-model", "net.prototxt", "-batch", "2"]) == 0
    data_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data "))
    assert data_row.split()[:4] == ["data", "Data", "2x3x4x4,", "2"]  # 4x4 images, no crop_size
