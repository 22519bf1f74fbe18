"""Solver states both ways: Caffe's SolverState (binary and HDF5) read into our solvers, crafted states
refused in one line, and the leftovers of a killed snapshot writer (a real kill -9) cleaned up."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import array_to_blob
from resnet_imagenet.proto.text import parse_text
from resnet_imagenet.solver.solver import CaffeSolver
from resnet_imagenet.train.setup import learnables
from resnet_imagenet.train.snapshot import load_solverstate, remove_stale_temporaries, save_snapshot
from resnet_imagenet.train.solverstate import read_caffemodel_h5
from resnet_imagenet.util.atomic import temp_prefix

NET = """name: "n" layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }"""

# One update from history h = 0.5 (h2 = 0.25), gradient 1, lr 0.1 at iteration 3 (Adam: t = 4), delta 0.5,
# momentum 0.9 (AdaGrad/RMSProp: 0, rms_decay 0.9), momentum2 0.999; the step w -= step, by hand:
STEPS = {
    "SGD": 0.55,  # 0.9*0.5 + 0.1*1
    "Nesterov": 0.595,  # 1.9*0.55 - 0.9*0.5
    "AdaGrad": 0.0579796,  # 0.1 / (sqrt(1.5) + 0.5)
    "RMSProp": 0.0805399,  # h = 0.9*0.5 + 0.1 = 0.55; 0.1 / (sqrt(0.55) + 0.5)
    "AdaDelta": 0.0845154,  # h = 0.55; 0.1 * sqrt((0.25 + 0.5) / (0.55 + 0.5))
    "Adam": 0.0100997,  # m = 0.55, v = 0.25075; 0.1 * sqrt(1-0.999^4)/(1-0.9^4) * m / (sqrt(v) + 0.5)
}


def net():
    return load_net(parse_text(NET, caffe_pb2.NetParameter()), phase="test")


def solver_param(kind: str) -> caffe_pb2.SolverParameter:
    momentum = 0 if kind in ("AdaGrad", "RMSProp") else 0.9
    text = f'type: "{kind}" lr_policy: "fixed" base_lr: 0.1 delta: 0.5 momentum: {momentum} rms_decay: 0.9'
    return parse_text(text, caffe_pb2.SolverParameter())


def caffe_state(n, kind: str, it: int = 3, learned_net: str = "runs/x/n_iter_3.caffemodel") -> caffe_pb2.SolverState:
    """A SolverState as Caffe writes one, by hand: h of every blob, then (AdaDelta, Adam) h2 of every blob."""
    shapes = [tuple(p.shape) for p in n.parameters()]
    st = caffe_pb2.SolverState(iter=it, learned_net=learned_net, current_step=0)
    st.history.extend(array_to_blob(np.full(s, 0.5)) for s in shapes)
    if kind in ("AdaDelta", "Adam"):
        st.history.extend(array_to_blob(np.full(s, 0.25)) for s in shapes)
    return st


@pytest.mark.parametrize("kind", list(STEPS))
def test_a_caffe_solverstate_resumes_to_the_formulas_next_update(tmp_path, kind):
    n = net()
    n.save_caffemodel(tmp_path / "n_iter_3.caffemodel")  # learned_net names it by Caffe's (cwd-relative) path
    (tmp_path / "n_iter_3.solverstate").write_bytes(caffe_state(n, kind).SerializeToString())
    st = load_solverstate(tmp_path / "n_iter_3.solverstate", max_iter=10)
    assert (st.iter, st.current_step, st.model, st.extra) == (3, 0, tmp_path / "n_iter_3.caffemodel", None)
    resumed = net()
    resumed.load_caffemodel(st.model)
    s = CaffeSolver(solver_param(kind), learnables(resumed))
    s.load_state_dict(s.state_from_caffe(st.history))
    before = [p.detach().clone() for p in resumed.parameters()]
    for p in resumed.parameters():
        p.grad = torch.ones_like(p)
    s.apply_update(st.iter)
    for b, p in zip(before, resumed.parameters()):
        assert torch.allclose(b - p.detach(), torch.full_like(b, STEPS[kind]), atol=1e-6)
    # and our own state of it is Caffe's again: history in Caffe's order
    assert [h.shape for h in s.caffe_history()] == [torch.Size(b.shape.dim) for b in caffe_state(n, kind).history]


def test_caffe_hdf5_solverstate_and_weights(tmp_path):
    h5py = pytest.importorskip("h5py")
    n = net()
    with torch.no_grad():
        n.layers["fc"].weight.copy_(torch.arange(6.0).reshape(3, 2))
        n.layers["fc"].bias.copy_(torch.tensor([7.0, 8.0, 9.0]))
    # caffe: Net::ToHDF5 (data/<layer>/<i>) and SnapshotSolverStateToHDF5 (iter, learned_net, current_step, history/i)
    with h5py.File(tmp_path / "n_iter_4.caffemodel.h5", "w") as f:
        for i, p in enumerate(n.layers["fc"].blobs()):
            f.create_dataset(f"data/fc/{i}", data=p.detach().numpy())
    with h5py.File(tmp_path / "n_iter_4.solverstate.h5", "w") as f:
        f["iter"] = np.array([4], np.int32)
        f["learned_net"] = np.bytes_("snap/n_iter_4.caffemodel.h5")
        f["current_step"] = np.array([1], np.int32)
        f["history/0"] = np.full((3, 2), 0.5, np.float32)
        f["history/1"] = np.full((3,), 0.5, np.float32)
    st = load_solverstate(tmp_path / "n_iter_4.solverstate.h5", max_iter=10)
    assert (st.iter, st.current_step, st.model.name) == (4, 1, "n_iter_4.caffemodel.h5")
    assert [h.tolist() for h in st.history] == [[[0.5] * 2] * 3, [0.5] * 3]
    again = net()
    again.copy_from(read_caffemodel_h5(st.model))
    assert torch.equal(again.layers["fc"].weight, n.layers["fc"].weight)
    assert torch.equal(again.layers["fc"].bias, n.layers["fc"].bias)


def test_our_snapshot_is_a_caffe_state_plus_a_sidecar_and_reads_back(tmp_path):
    n = net()
    history = [torch.full(tuple(p.shape), 0.125) for p in n.parameters()]
    extra = {"seed": 5, "world_size": 1, "solver_type": "SGD", "rng": [{"torch": torch.get_rng_state()}],
             "train_feeds": [[{"epoch": 0, "index": 8}]], "test_feeds": [], "smoothing": {}, "scaler": {}}  # fmt: skip
    model, state = save_snapshot(n, str(tmp_path / "snap" / "n"), 10, history=history, current_step=2, extra=extra)
    proto = caffe_pb2.SolverState.FromString(state.read_bytes())
    assert (proto.iter, proto.learned_net, proto.current_step) == (10, str(model), 2)
    assert [list(b.data) for b in proto.history] == [h.flatten().tolist() for h in history]
    st = load_solverstate(state, max_iter=10)
    assert st.model == model and st.extra["seed"] == 5 and st.extra["train_feeds"] == [[{"epoch": 0, "index": 8}]]
    assert sorted(p.name for p in model.parent.iterdir()) == [
        "n_iter_10.caffemodel", "n_iter_10.solverstate", "n_iter_10.solverstate.resnet_imagenet.pt"
    ]  # fmt: skip


def test_a_version_1_solverstate_still_reads(tmp_path):
    n = net()
    n.save_caffemodel(tmp_path / "n_iter_2.caffemodel")
    old = {"format": "resnet_imagenet.solverstate/1", "iter": 2, "learned_net": "n_iter_2.caffemodel", "seed": 1,
           "world_size": 1, "solver": {"type": "SGD", "history": [torch.ones(3, 2), torch.ones(3)], "history2": []},
           "rng": [{"torch": torch.get_rng_state()}], "train_feeds": [[{"epoch": 0, "index": 4}]],
           "test_feeds": [], "smoothing": {}, "scaler": {}}  # fmt: skip
    torch.save(old, tmp_path / "n_iter_2.solverstate")
    st = load_solverstate(tmp_path / "n_iter_2.solverstate", max_iter=5)
    assert st.iter == 2 and st.history is None and st.solver["type"] == "SGD" and st.extra["solver_type"] == "SGD"


def _write(tmp_path: Path, st: caffe_pb2.SolverState, sidecar: dict | None = None) -> Path:
    net().save_caffemodel(tmp_path / "n_iter_3.caffemodel")
    path = tmp_path / "n_iter_3.solverstate"
    path.write_bytes(st.SerializeToString())
    if sidecar is not None:
        buf = io.BytesIO()
        torch.save(sidecar, buf)
        Path(f"{path}.resnet_imagenet.pt").write_bytes(buf.getvalue())
    return path


GOOD_SIDE = {"format": "resnet_imagenet.sidecar/2", "iter": 3, "learned_net": "n_iter_3.caffemodel", "seed": 1,
             "world_size": 1, "solver_type": "SGD", "rng": [{"torch": torch.zeros(4, dtype=torch.uint8)}],
             "train_feeds": [[{"epoch": 0, "index": 0}]], "test_feeds": [], "smoothing": {}, "scaler": {}}  # fmt: skip


@pytest.mark.parametrize(
    "edit, side, exc, msg",
    [
        ({"learned_net": "/etc/passwd"}, None, ValueError, r"learned_net '/etc/passwd' does not name a \.caffemodel"),
        ({"learned_net": "../../elsewhere/n_iter_3.caffemodel"}, None, None, ""),  # read beside it, not at ../..
        ({"learned_net": "../../x.caffemodel"}, None, FileNotFoundError, "{tmp}/x.caffemodel are missing"),
        ({"iter": 10**9}, None, ValueError, r"iter 1000000000 is outside \[0, max_iter 10\]"),
        ({"iter": -1}, None, ValueError, r"iter -1 is outside"),
        ({"current_step": -2}, None, ValueError, "current_step -2 is negative"),
        ({}, {k: v for k, v in GOOD_SIDE.items() if k != "seed"}, ValueError, "field 'seed' is missing"),
        ({}, {**GOOD_SIDE, "iter": 4}, ValueError, "written for iteration 4"),
        ({}, {**GOOD_SIDE, "world_size": 2}, ValueError, "rng has 1 entries for world_size 2"),
        ({}, {**GOOD_SIDE, "train_feeds": [[{"epoch": -1, "index": 0}]]}, ValueError, "epoch is -1"),
        ({}, {**GOOD_SIDE, "seed": "7"}, ValueError, "field 'seed' is a str"),
        ({}, {**GOOD_SIDE, "format": "x"}, ValueError, "not a resnet-imagenet solverstate sidecar"),
    ],
)
def test_a_crafted_solverstate_is_refused_in_one_line(tmp_path, edit, side, exc, msg):
    st = caffe_state(net(), "SGD")
    for k, v in edit.items():
        setattr(st, k, v)
    path = _write(tmp_path, st, side)
    if exc is None:
        assert load_solverstate(path, max_iter=10).model == tmp_path / "n_iter_3.caffemodel"
        return
    with pytest.raises(exc, match=msg.replace("{tmp}", str(tmp_path))) as e:
        load_solverstate(path, max_iter=10)
    assert "\n" not in str(e.value) and str(path.parent) in str(e.value)


def test_history_of_another_net_or_solver_type_is_refused(tmp_path):
    n = net()
    sgd = CaffeSolver(solver_param("SGD"), learnables(n))
    adam = CaffeSolver(solver_param("Adam"), learnables(n))
    st = caffe_state(n, "SGD")
    blobs = load_solverstate(_write(tmp_path, st), 10).history
    with pytest.raises(ValueError, match=r"2 history blobs, but solver type Adam on this net has 4 \(two per"):
        adam.state_from_caffe(blobs)
    with pytest.raises(ValueError, match=r"history blob fc\[0\] has shape \(2, 3\), the net \(3, 2\)"):
        sgd.state_from_caffe([torch.zeros(2, 3), torch.zeros(3)])
    st.history[1].data.append(1.0)  # 4 values in a blob of shape (3,)
    with pytest.raises(ValueError, match=r"history blob #1: blob holds 4 values but its shape \(3,\) needs 3"):
        load_solverstate(_write(tmp_path, st), 10)
    (tmp_path / "n_iter_3.solverstate").write_bytes(b"\x08\x03\x12\xff")
    with pytest.raises(ValueError, match="not a solverstate"):
        load_solverstate(tmp_path / "n_iter_3.solverstate", 10)


WRITER = """import sys, time
from pathlib import Path
from resnet_imagenet.util.atomic import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"half a caffemodel")
    print(tmp, flush=True)
    time.sleep(60)
"""


def _writer(target: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_snapshot_writers_temporary_is_removed_by_the_next_snapshot(tmp_path):
    snap = tmp_path / "snap"
    dead, dead_tmp = _writer(snap / "n_iter_100.caffemodel")
    live, live_tmp = _writer(snap / "n_iter_200.caffemodel")
    try:
        assert dead_tmp.name.startswith(temp_prefix("n_iter_100.caffemodel", dead.pid)) and dead_tmp.exists()
        os.kill(dead.pid, signal.SIGKILL)  # killed inside the write: nothing of its own cleans up
        dead.wait(timeout=10)
        assert dead_tmp.exists() and not (snap / "n_iter_100.caffemodel").exists()
        n = net()
        hist = [torch.zeros(tuple(p.shape)) for p in n.parameters()]
        extra = {**GOOD_SIDE, "rng": [{"torch": torch.get_rng_state()}]}
        save_snapshot(n, str(snap / "n"), 300, history=hist, current_step=0, extra=extra)
        assert not dead_tmp.exists()  # its writer is dead
        assert live_tmp.exists()  # a running writer's temporary is left alone
        assert remove_stale_temporaries(snap, "n") == []
    finally:
        live.kill()
        live.wait(timeout=10)
        dead.kill()


def test_a_caffemodel_without_its_solverstate_is_reported_on_resume(tmp_path):
    n = net()
    hist = [torch.zeros(tuple(p.shape)) for p in n.parameters()]
    save_snapshot(n, str(tmp_path / "n"), 100, history=hist, current_step=0, extra={**GOOD_SIDE, "iter": 100})
    n.save_caffemodel(tmp_path / "n_iter_200.caffemodel")  # the run was killed before the solverstate of 200
    with pytest.raises(FileNotFoundError) as e:
        load_solverstate(tmp_path / "n_iter_200.solverstate", max_iter=1000)
    msg = str(e.value)
    assert "its caffemodel n_iter_200.caffemodel exists" in msg and "interrupted before its solver state" in msg
    assert f"resume from {tmp_path / 'n_iter_100.solverstate'}" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match=r"n_iter_300\.solverstate: no such solverstate$"):
        load_solverstate(tmp_path / "n_iter_300.solverstate", max_iter=1000)
