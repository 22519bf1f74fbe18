"""Blobs shared by ``param { name }`` (caffe: net.cpp AppendParam): one tensor, the summed gradient, one update,
Caffe's checks, caffemodel I/O and an exact resume."""

from __future__ import annotations

import logging
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import array_to_blob
from resnet_imagenet.proto.text import PrototxtError, parse_text
from resnet_imagenet.solver.solver import CaffeSolver
from resnet_imagenet.train.setup import learnables
from resnet_imagenet.train.trainer import TrainOptions, train

TWO_TOWERS = """
name: "towers"
layer { name: "in" type: "Input" top: "xa" top: "xb" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip_a" type: "InnerProduct" bottom: "xa" top: "ya" %(pa)s
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "xb" top: "yb" %(pb)s
  inner_product_param { num_output: %(nb)d weight_filler { type: "gaussian" std: 1 } } }
"""
SHARED = 'param { name: "w" } param { name: "b" }'


def towers(pa: str = SHARED, pb: str = SHARED, nb: int = 2):
    return load_net(parse_text(TWO_TOWERS % {"pa": pa, "pb": pb, "nb": nb}, caffe_pb2.NetParameter()), phase="train")


def test_one_tensor_whose_gradient_is_the_sum_of_both_towers():
    torch.manual_seed(0)
    net = towers().double()
    a, b = net.layers["ip_a"], net.layers["ip_b"]
    assert a.weight is b.weight and a.bias is b.bias
    rng = np.random.default_rng(1)
    xa, xb, ga, gb = (rng.standard_normal((2, k)) for k in (3, 3, 2, 2))
    out = net(torch.from_numpy(xa), torch.from_numpy(xb))
    (out["ya"] * torch.from_numpy(ga)).sum().add((out["yb"] * torch.from_numpy(gb)).sum()).backward()
    # by hand: y = x W^T + b in each tower, so dL/dW = ga^T xa + gb^T xb and dL/db = sum ga + sum gb
    np.testing.assert_allclose(a.weight.grad.numpy(), ga.T @ xa + gb.T @ xb, rtol=1e-12)
    np.testing.assert_allclose(a.bias.grad.numpy(), ga.sum(0) + gb.sum(0), rtol=1e-12)


def test_sgd_updates_the_shared_blob_once_and_the_towers_stay_identical():
    torch.manual_seed(0)
    net = towers().double()
    ls = learnables(net)
    assert [x.name for x in ls] == ["ip_a[0]", "ip_a[1]"]  # caffe: learnable_params_ holds the owner's only
    sp = caffe_pb2.SolverParameter(base_lr=0.125, lr_policy="fixed", type="SGD")
    solver = CaffeSolver(sp, ls)
    rng = np.random.default_rng(2)
    w = net.layers["ip_a"].weight.detach().numpy().copy()
    for it in range(3):
        xa, xb, ga, gb = (rng.standard_normal((2, k)) for k in (3, 3, 2, 2))
        net.zero_grad()
        out = net(torch.from_numpy(xa), torch.from_numpy(xb))
        ((out["ya"] * torch.from_numpy(ga)).sum() + (out["yb"] * torch.from_numpy(gb)).sum()).backward()
        solver.apply_update(it)
        w = w - 0.125 * (ga.T @ xa + gb.T @ xb)  # one step with the summed gradient, not two
        np.testing.assert_allclose(net.layers["ip_a"].weight.detach().numpy(), w, rtol=1e-12)
        assert torch.equal(net.layers["ip_b"].weight, net.layers["ip_a"].weight)


def test_mismatched_shapes_are_refused_naming_both_layers():
    want = (
        r"layer 'ip_b': cannot share param 'w' owned by layer 'ip_a': shape mismatch "
        r"\(owner blob 0 has shape \(2, 3\), this layer's blob 0 \(3, 3\)\)"
    )
    with pytest.raises(PrototxtError, match=want):
        towers(nb=3)
    permissive = 'param { name: "w" share_mode: PERMISSIVE }'
    with pytest.raises(PrototxtError, match="'ip_a': count mismatch"):
        towers(pb=permissive, nb=3)
    # same count, another shape: Caffe views the owner's data in the sharer's shape; refused here, in one line
    text = TWO_TOWERS.replace('top: "xb" input_param { shape { dim: 2 dim: 3 } }', 'top: "xb" input_param '
                              '{ shape { dim: 2 dim: 3 } shape { dim: 3 dim: 2 } }')  # fmt: skip
    param = parse_text(text % {"pa": SHARED, "pb": permissive, "nb": 3}, caffe_pb2.NetParameter())
    with pytest.raises(PrototxtError, match=r"share_mode PERMISSIVE between the shapes \(2, 3\) and \(3, 2\)"):
        load_net(param)
    same = towers(pb=permissive)  # PERMISSIVE with the same shape shares, as STRICT does
    assert same.layers["ip_b"].weight is same.layers["ip_a"].weight


def test_multipliers_must_agree_and_a_sharers_own_is_adopted():
    with pytest.raises(PrototxtError, match="layer 'ip_b': shared param 'w' has mismatched lr_mult"):
        towers(pa='param { name: "w" lr_mult: 1 }', pb='param { name: "w" lr_mult: 2 }')
    with pytest.raises(PrototxtError, match="layer 'ip_b': shared param 'w' has mismatched decay_mult"):
        towers(pa='param { name: "w" decay_mult: 1 }', pb='param { name: "w" decay_mult: 0 }')
    # caffe: an owner without lr_mult takes the first sharer's (AppendParam: has_params_lr_)
    net = towers(pa='param { name: "w" }', pb='param { name: "w" lr_mult: 3 decay_mult: 0 }')
    mults = {(layer, i): (lr, decay) for layer, i, _, lr, decay in net.learnable()}
    assert mults[("ip_a", 0)] == mults[("ip_b", 0)] == (3.0, 0.0)
    assert mults[("ip_a", 1)] == (1.0, 1.0)  # the unnamed bias of ip_a: its own spec (defaults)
    assert [(x.name, x.lr_mult, x.decay_mult) for x in learnables(net)][0] == ("ip_a[0]", 3.0, 0.0)


def test_caffemodel_every_layer_writes_its_blobs_and_the_last_copy_wins(tmp_path):
    torch.manual_seed(0)
    net = towers(pb='param { name: "w" } param { name: "b" }')
    net.save_caffemodel(tmp_path / "a.caffemodel")
    saved = caffe_pb2.NetParameter.FromString((tmp_path / "a.caffemodel").read_bytes())
    blobs = {lp.name: [b.SerializeToString() for b in lp.blobs] for lp in saved.layer}
    assert len(blobs["ip_b"]) == 2 and blobs["ip_b"] == blobs["ip_a"]  # caffe: Net::ToProto, per layer
    again = towers()
    again.load_caffemodel(tmp_path / "a.caffemodel")
    again.save_caffemodel(tmp_path / "b.caffemodel")
    assert (tmp_path / "b.caffemodel").read_bytes() == (tmp_path / "a.caffemodel").read_bytes()
    # caffe: CopyTrainedLayersFrom copies by layer name in file order, into the one shared blob: the last wins
    wa, wb = np.ones((2, 3), np.float32), np.full((2, 3), 2.0, np.float32)
    src = caffe_pb2.NetParameter()
    for name, w in (("ip_b", wb), ("ip_a", wa)):
        src.layer.add(name=name).blobs.extend([array_to_blob(w), array_to_blob(np.zeros(2, np.float32))])
    again.copy_from(src)
    assert torch.equal(again.layers["ip_b"].weight, torch.from_numpy(wa))


PAIR_NET = """
name: "pairs"
layer { name: "pair" type: "Data" top: "pair" top: "label" data_param { source: "pairs_lmdb" batch_size: 4 } }
layer { name: "slice" type: "Slice" bottom: "pair" top: "x" top: "x_p" slice_param { slice_dim: 1 slice_point: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "f" param { name: "ip_w" lr_mult: 1 }
  param { name: "ip_b" lr_mult: 2 } inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "ip_p" type: "InnerProduct" bottom: "x_p" top: "f_p" param { name: "ip_w" lr_mult: 1 }
  param { name: "ip_b" lr_mult: 2 } inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "sum" type: "Eltwise" bottom: "f" bottom: "f_p" top: "s" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "label" top: "loss" }
"""
PAIR_SOLVER = """net: "net.prototxt" base_lr: 0.05 lr_policy: "fixed" momentum: 0.9 weight_decay: 0.01
max_iter: %d snapshot: 3 snapshot_prefix: "snap/pairs" display: 1 random_seed: 3 solver_mode: CPU
"""


def test_snapshot_and_resume_are_exact_with_shared_blobs(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(0)
    env = lmdb.open(str(tmp_path / "pairs_lmdb"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i in range(12):  # pairs of 4x4 gray images as the two channels, as BVLC's siamese LMDB
            txn.put(f"{i:08d}".encode(), encode_datum(rng.integers(0, 256, (4, 4, 2), dtype=np.uint8), i % 3))
    env.close()
    monkeypatch.chdir(tmp_path)
    Path("net.prototxt").write_text(PAIR_NET)

    def run(max_iter: int, resume: str | None = None) -> None:
        Path("solver.prototxt").write_text(PAIR_SOLVER % max_iter)
        with caplog.at_level(logging.INFO):
            assert train(TrainOptions(solver="solver.prototxt", snapshot=resume, workers=0, gpu="cpu")) == 0

    run(6)
    final = Path("snap/pairs_iter_6.caffemodel").read_bytes()
    state = caffe_pb2.SolverState.FromString(Path("snap/pairs_iter_6.solverstate").read_bytes())
    assert [tuple(h.shape.dim) for h in state.history] == [(3, 16), (3,)]  # one history blob per shared blob
    saved = {lp.name: list(lp.blobs) for lp in caffe_pb2.NetParameter.FromString(final).layer}
    assert saved["ip_p"] == saved["ip"] and saved["ip"]
    Path("snap").rename("straight")
    run(3)
    run(6, resume="snap/pairs_iter_3.solverstate")
    assert Path("snap/pairs_iter_6.caffemodel").read_bytes() == final
    again = caffe_pb2.SolverState.FromString(Path("snap/pairs_iter_6.solverstate").read_bytes())
    state.learned_net = again.learned_net = ""
    assert again.SerializeToString() == state.SerializeToString()
