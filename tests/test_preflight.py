"""Issue 13: what train, test, classify and ``train --check`` refuse before a silently wrong number -- TRAIN and TEST
class lists that disagree (9), weights that miss the net (10), classify's mean (11), a classifier short of classes,
a test pass longer than the TEST DB, a full-size mean over --min_dim records (13), errors that say what to do (15).
Real LMDBs built by our convert_imageset from real image folders; the commands run as real processes."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import resnet_imagenet
from resnet_imagenet.data.convert import ConvertOptions, convert_imageset

CODE = Path(resnet_imagenet.__file__).resolve().parents[1]  # the checkout under test, for the CLI processes

NET = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 8 %(mean)s }
  data_param { source: "train_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 8 mean_value: 128 }
  data_param { source: "%(val)s" batch_size: 4 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: %(classes)d weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" include { phase: TEST } }
"""

SOLVER = """net: "net.prototxt"
base_lr: 0.01
lr_policy: "fixed"
max_iter: 2
test_iter: %(test_iter)d
test_interval: 2
display: 1
snapshot_prefix: "snap/tiny"
random_seed: 7
"""


def folders(root: Path, classes: str, per_class: int = 4, sizes=((12, 12),), seed: int = 0) -> Path:
    """ROOT/<class>/<i>.png: real PNG files, sizes cycling through ``sizes``."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            assert cv2.imwrite(str(root / c / f"{i}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return root


def db(tmp: Path, name: str, classes: str, **opts) -> Path:
    """A folder-walked LMDB (classes numbered from its own folders, as convert_imageset ROOT/ DB does)."""
    sizes = opts.pop("sizes", ((12, 12),))
    root = folders(tmp / f"img_{name}", classes, sizes=sizes)
    convert_imageset(root, None, tmp / name, ConvertOptions(**opts), jobs=1, progress=False)
    return tmp / name


def project(tmp: Path, *, train="abcd", val="abd", classes=4, test_iter=4, mean="mean_value: 128") -> None:
    """train_lmdb and val_lmdb from class folders, a train_val net and its solver, in ``tmp``."""
    db(tmp, "train_lmdb", train)
    if val:
        db(tmp, "val_lmdb", val)
    (tmp / "net.prototxt").write_text(NET % {"classes": classes, "mean": mean, "val": "val_lmdb"})
    (tmp / "solver.prototxt").write_text(SOLVER % {"test_iter": test_iter})


def cli(tmp: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``resnet-imagenet ARGS`` as a real process in ``tmp``, this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=str(CODE), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "resnet_imagenet", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("resnet-imagenet ")]


def weights(tmp: Path, rename: dict[str, str] | None = None, model: str = "net.prototxt") -> Path:
    """A caffemodel of the TEST net of ``model``, its layers renamed by ``rename`` (another net's file)."""
    from resnet_imagenet.net.net import load_net

    net = load_net(tmp / model, phase="test", input_shapes={"data": (4, 3, 8, 8), "label": (4,)})
    proto = net.to_proto()
    for lp in proto.layer:
        lp.name = (rename or {}).get(lp.name, lp.name)
    out = tmp / ("other.caffemodel" if rename else "w.caffemodel")
    out.write_bytes(proto.SerializeToString())
    return out


# -- 9, 13, 15: train --check reports every problem, one line each ------------------------------------------


def test_check_reports_every_problem_one_line_each(tmp_path):
    # val/ lacks class c: its d is label 2, train's 3; fc has 3 outputs for 4 classes; 10 x 4 images > 12
    project(tmp_path, classes=3, test_iter=10)
    r = cli(tmp_path, "train", "--solver", "solver.prototxt", "--check", "--workers", "0")
    assert r.returncode == 1
    t, v = tmp_path / "train_lmdb", tmp_path / "val_lmdb"
    assert errors(r.stderr) == [
        f"resnet-imagenet train: error: class lists differ: label 2 is 'c' in TRAIN {t} (layer 'data' of "
        f"net.prototxt (TRAIN)) but 'd' in TEST {v} (layer 'data' of net.prototxt (TEST)); rebuild the TEST DB "
        f"with the TRAIN DB's classes (convert_imageset --classes-from {t})",
        f"resnet-imagenet train: error: layer 'fc' of net.prototxt (TRAIN): num_output 3 is below the 4 classes "
        f"of {t} (labels 0..3 in its resnet_imagenet_meta.json); set num_output: 4",
        f"resnet-imagenet train: error: test_iter 10 x batch_size 4 = 40 images per test pass, but TEST {v} "
        "(layer 'data' of net.prototxt (TEST)) has 12: images would count more than once; set test_iter: 3",
    ], r.stderr[-3000:]
    assert "Check passed" not in r.stderr


def test_check_passes_a_good_project_and_a_val_set_lacking_only_the_last_classes(tmp_path):
    project(tmp_path, val="abc", test_iter=3)  # c, d... labels 0..2 mean the same classes in both DBs
    r = cli(tmp_path, "train", "--solver", "solver.prototxt", "--check", "--workers", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert errors(r.stderr) == [] and "Check passed" in r.stderr


def test_train_refuses_class_lists_that_disagree_before_anything_is_written(tmp_path):
    project(tmp_path)
    r = cli(tmp_path, "train", "--solver", "solver.prototxt", "--workers", "0")
    assert r.returncode == 1
    assert len(errors(r.stderr)) == 1 and "class lists differ: label 2 is 'c' in TRAIN" in r.stderr
    assert not (tmp_path / "snap").exists() and "Iteration" not in r.stderr


def test_class_list_longer_than_num_output_is_a_problem(tmp_path):
    from resnet_imagenet.proto.text import read_solver
    from resnet_imagenet.train import preflight
    from resnet_imagenet.train.setup import solver_nets

    (tmp_path / "img_train_lmdb" / "e").mkdir(parents=True)  # an empty last class: labels 0..3, 5 names
    project(tmp_path, val="", test_iter=1)
    (tmp_path / "solver.prototxt").write_text(SOLVER.replace("test_iter: %(test_iter)d\ntest_interval: 2\n", ""))
    os.chdir(tmp_path)
    sp = read_solver(tmp_path / "solver.prototxt")
    refusals, doubts = preflight.problems(sp, *solver_nets(sp, check_data=False))
    assert (
        refusals
        == [
            f"layer 'fc' of net.prototxt (TRAIN): num_output 4 is below the 5 classes of {tmp_path / 'train_lmdb'} "
            "(5 names in its class list); set num_output: 5"
        ]
        and doubts == []
    )


def test_test_iter_up_to_ceil_of_the_test_db_is_accepted(tmp_path):
    from resnet_imagenet.proto import caffe_pb2
    from resnet_imagenet.train import preflight

    db(tmp_path, "val_lmdb", "abc")  # 12 records
    feeds = preflight.sources(_test_net(5), "net.prototxt (TEST)", tmp_path)
    sp = caffe_pb2.SolverParameter(test_iter=[3])  # 15 = ceil(12 / 5) batches: only the last wraps
    assert preflight.test_iter_problems(sp, [feeds]) == []
    sp.test_iter[:] = [4]
    assert preflight.test_iter_problems(sp, [feeds]) == [
        f"test_iter 4 x batch_size 5 = 20 images per test pass, but TEST {tmp_path / 'val_lmdb'} (layer 'data' of "
        "net.prototxt (TEST)) has 12: images would count more than once; set test_iter: 2"
    ]


def _test_net(batch: int):
    from resnet_imagenet.proto import caffe_pb2
    from resnet_imagenet.proto.text import parse_text

    return parse_text(
        f'layer {{ name: "data" type: "Data" top: "data" top: "label" data_param {{ source: "val_lmdb" '
        f"batch_size: {batch} }} }}",
        caffe_pb2.NetParameter(),
    )


def test_train_warns_of_a_test_pass_longer_than_the_test_db_and_runs(tmp_path):
    project(tmp_path, val="abcd", test_iter=5)  # 5 x 4 = 20 > 16 images
    r = cli(tmp_path, "train", "--solver", "solver.prototxt", "--workers", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test_iter 5 x batch_size 4 = 20 images per test pass" in r.stderr and "Optimization Done." in r.stderr


def test_check_refuses_a_full_size_mean_over_min_dim_records(tmp_path):
    from resnet_imagenet.proto.blob import write_blobproto

    # --min_dim 16: 20x20 -> 16x16 (record 0, the mean's size), 20x30 -> 16x24, 30x20 -> 24x16
    db(tmp_path, "train_lmdb", "abcd", min_dim=16, sizes=((20, 20), (20, 30), (30, 20)))
    db(tmp_path, "val_lmdb", "abcd")
    write_blobproto(np.full((1, 3, 16, 16), 128, np.float32), tmp_path / "mean.binaryproto")
    (tmp_path / "net.prototxt").write_text(NET % {"classes": 4, "mean": 'mean_file: "mean.binaryproto"',
                                                  "val": "val_lmdb"})  # fmt: skip
    (tmp_path / "solver.prototxt").write_text(SOLVER % {"test_iter": 4})
    r = cli(tmp_path, "train", "--solver", "solver.prototxt", "--check", "--workers", "0")
    assert r.returncode == 1
    assert errors(r.stderr) == [
        f"resnet-imagenet train: error: layer 'data': mean.binaryproto is a full-size 16x16 mean, but "
        f"{tmp_path / 'train_lmdb'} was built with --min_dim 16 (8 of its 16 records are 16x16; its "
        "resnet_imagenet_meta.json lists 3x16x16, 3x16x24, 3x24x16): use mean_value (compute_image_mean logs the "
        "per-channel values) or a mean of crop_size"
    ], r.stderr[-3000:]


# -- 9 (test side), 10, 15: test --------------------------------------------------------------------------


def test_test_refuses_disagreeing_class_lists_foreign_weights_and_names_a_missing_lmdb(tmp_path):
    project(tmp_path)
    own, other = weights(tmp_path), weights(tmp_path, {"conv1": "conv_a", "fc": "fc_a"})
    r = cli(tmp_path, "test", "--model", "net.prototxt", "--weights", str(own), "--workers", "0")
    assert r.returncode == 1 and len(errors(r.stderr)) == 1
    assert (
        "class lists differ: label 2 is 'c' in TRAIN" in r.stderr
        and "(layer 'data' of net.prototxt (TEST))" in r.stderr
    )

    db(tmp_path, "val_all", "abcd")
    (tmp_path / "net.prototxt").write_text(NET % {"classes": 4, "mean": "mean_value: 128", "val": "val_all"})
    r = cli(tmp_path, "test", "--model", "net.prototxt", "--weights", str(other), "--workers", "0")
    assert r.returncode == 1
    assert errors(r.stderr) == [
        f"resnet-imagenet test: error: {other}: no weights for 2 of the net's 2 layers with blobs (conv1, fc): "
        "weights are copied by layer name; is it another net's file? (--allow-missing-weights runs them on their "
        "fillers)"
    ], r.stderr[-2000:]
    r = cli(tmp_path, "test", "--model", "net.prototxt", "--weights", str(other), "--workers", "0",
            "--allow-missing-weights")  # fmt: skip
    assert r.returncode == 0 and "they start from their fillers" in r.stderr, r.stderr[-2000:]

    (tmp_path / "net.prototxt").write_text(NET % {"classes": 4, "mean": "mean_value: 128", "val": "no_such_lmdb"})
    r = cli(tmp_path, "test", "--model", "net.prototxt", "--weights", str(own), "--workers", "0")
    missing = tmp_path / "no_such_lmdb"
    assert errors(r.stderr) == [
        f"resnet-imagenet test: error: layer 'data' of net.prototxt (TEST): source {missing}: no LMDB there; "
        f"build it with `resnet-imagenet convert_imageset ROOT/ [LISTFILE] {missing}` (or convert_imagenet)"
    ], r.stderr[-2000:]


def test_train_weights_of_another_net_refused_partial_ones_named(tmp_path, caplog):
    from resnet_imagenet.net.net import load_net
    from resnet_imagenet.net.weights import load_weights

    project(tmp_path, val="")
    os.chdir(tmp_path)
    net = load_net(tmp_path / "net.prototxt", phase="test", input_shapes={"data": (4, 3, 8, 8), "label": (4,)})
    other = weights(tmp_path, {"conv1": "conv_a", "fc": "fc_a"}, model="net.prototxt")
    with pytest.raises(ValueError, match=r"no weights for 2 of the net's 2 layers with blobs \(conv1, fc\).*"
                                         r"nothing to fine-tune"):  # fmt: skip
        load_weights(net, other, missing="finetune")
    part = weights(tmp_path, {"fc": "fc_new"})  # conv1 matches: fine-tuning a new classifier
    before = net.layers["fc"].weight.detach().clone()
    assert load_weights(net, part, missing="finetune") == ["fc"]
    assert "no weights for 1 of the net's 2 layers with blobs (fc): they start from their fillers" in caplog.text
    assert torch.equal(net.layers["fc"].weight, before)


# -- 10, 11: classify -------------------------------------------------------------------------------------

DEPLOY = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_classify_takes_the_mean_and_scale_of_the_train_val_beside_the_deploy(tmp_path, caplog):
    from resnet_imagenet.tools.classify import Classifier

    caplog.set_level(logging.INFO)
    project(tmp_path, mean="mean_value: 128", val="abcd")
    tv = (tmp_path / "net.prototxt").read_text().replace("crop_size: 8 mean_value: 128 }", "crop_size: 8 "
                                                         "mean_value: 100 scale: 0.5 }")  # fmt: skip
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train_val.prototxt").write_text(tv)
    (tmp_path / "m" / "deploy.prototxt").write_text(DEPLOY)
    w = weights(tmp_path)
    img = tmp_path / "img_val_lmdb" / "a" / "0.png"
    os.chdir(tmp_path)
    x = Classifier(tmp_path / "m" / "deploy.prototxt", w).preprocess(img.read_bytes())
    auto = Classifier(tmp_path / "m" / "deploy.prototxt", w)
    given = Classifier(tmp_path / "m" / "deploy.prototxt", w, mean="100", scale=0.5)
    none = Classifier(tmp_path / "m" / "deploy.prototxt", w, mean="none", scale=1.0)
    assert auto.scale == 0.5 and auto.mean.ravel().tolist() == [100, 100, 100]
    assert torch.equal(auto.scores(x), given.scores(x)) and not torch.equal(auto.scores(x), none.scores(x))
    assert "Mean: mean_value [100.0] (layer 'data' of" in caplog.text

    (tmp_path / "m" / "train_val.prototxt").unlink()
    r = cli(tmp_path, "classify", "--model", "m/deploy.prototxt", "--weights", str(w), str(img))
    assert r.returncode == 0, r.stderr[-2000:]
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("W")]
    assert len(warn) == 1 and warn[0].endswith(
        "m/deploy.prototxt: no --mean and no mean in a TEST data layer (nor a train_val.prototxt beside it): "
        "subtracting nothing (--mean none: on purpose)"
    ), r.stderr
    other = weights(tmp_path, {"fc": "fc_a"})
    r = cli(tmp_path, "classify", "--model", "m/deploy.prototxt", "--weights", str(other), "--mean", "none", str(img))
    assert r.returncode == 1 and errors(r.stderr) == [
        f"resnet-imagenet classify: error: {other}: no weights for 1 of the net's 2 layers with blobs (fc): weights "
        "are copied by layer name; is it another net's file? (--allow-missing-weights runs them on their fillers)"
    ], r.stderr[-2000:]
    r = cli(tmp_path, "classify", "--model", "m/deploy.prototxt", "--weights", str(other), "--mean", "none", str(img),
            "--allow-missing-weights")  # fmt: skip
    assert r.returncode == 0 and "they start from their fillers" in r.stderr, r.stderr[-2000:]
    r = cli(tmp_path, "classify", "--help")
    assert (
        "default: the mean_file / mean_value of the model's TEST data layer, or of the train_val.prototxt "
        "beside it, else none (warned)"
    ) in " ".join(r.stdout.split()), r.stdout


# -- 15: errors that say what to do, --version --------------------------------------------------------------


def test_a_gpu_that_does_not_exist_says_what_to_use_and_version_prints(tmp_path):
    from resnet_imagenet import __version__
    from resnet_imagenet.train.dist import parse_gpus

    n = torch.cuda.device_count()
    use = "cpu or cpu:N" if n == 0 else f"ids 0..{n - 1}, all, cpu or cpu:N"
    with pytest.raises(ValueError, match=re.escape(f"GPU {n} does not exist ({n} GPU") + r"s? visible\): use "
                       + re.escape(use) + "$"):  # fmt: skip
        parse_gpus(str(n))
    r = cli(tmp_path, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"resnet-imagenet {__version__}"
