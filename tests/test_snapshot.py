"""Snapshot names (Caffe's snapshot_prefix rules), weights_only solverstates, and crash-safe writes."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text
from resnet_imagenet.train.snapshot import load_solverstate, resolve_snapshot_prefix, save_snapshot

NET = """name: "n" layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }"""


def solver(text: str) -> caffe_pb2.SolverParameter:
    return parse_text(text, caffe_pb2.SolverParameter())


def test_snapshot_prefix_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        resolve_snapshot_prefix(solver(""), "prototxt_like/resnet_50/resnet_50_solver.prototxt")
        == "snapshots/resnet_50"
    )
    assert resolve_snapshot_prefix(solver('snapshot_prefix: "out/r50"'), "s.prototxt") == "out/r50"
    assert resolve_snapshot_prefix(solver('snapshot_prefix: "out/"'), "x/r_solver.prototxt") == "out/r"
    Path("existing").mkdir()
    assert resolve_snapshot_prefix(solver('snapshot_prefix: "existing"'), "solver.prototxt") == "existing/solver"


SIDE = {"seed": 1, "world_size": 1, "solver_type": "SGD", "rng": [{"torch": torch.zeros(4, dtype=torch.uint8)}],
        "train_feeds": [[]], "test_feeds": [], "smoothing": {}, "scaler": {}}  # fmt: skip


def test_pair_roundtrip_and_failed_write_keeps_previous(tmp_path):
    net = load_net(parse_text(NET, caffe_pb2.NetParameter()), phase="test")
    prefix = str(tmp_path / "snap" / "n")
    hist = [torch.ones(3, 2), torch.ones(3)]
    model, state = save_snapshot(net, prefix, 10, history=hist, current_step=0, extra=SIDE)
    assert (model.name, state.name) == ("n_iter_10.caffemodel", "n_iter_10.solverstate")
    loaded = load_solverstate(state, max_iter=10)
    assert loaded.iter == 10 and loaded.model == model and torch.equal(loaded.history[0], torch.ones(3, 2))
    before = state.read_bytes()
    # a state torch cannot save fails the write: the previous files stay, no temporary file is left
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_snapshot(net, prefix, 10, history=hist, current_step=0, extra={**SIDE, "bad": lambda: 0})
    assert state.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == [
        "n_iter_10.caffemodel", "n_iter_10.solverstate", "n_iter_10.solverstate.resnet_imagenet.pt"
    ]  # fmt: skip


def test_not_a_solverstate_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.solverstate"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a solverstate"):
        load_solverstate(bad, max_iter=10)
    with pytest.raises(FileNotFoundError, match="no such solverstate"):
        load_solverstate(tmp_path / "missing.solverstate", max_iter=10)
