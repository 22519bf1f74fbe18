"""Training end to end on a real tiny LMDB: Caffe's log lines, snapshots, exact resume, processes, bad input."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from resnet_imagenet.cli import build_parser
from resnet_imagenet.cli import main as cli_main
from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.data.feed import DataFeed
from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import TEST, TRAIN, parse_text
from resnet_imagenet.train.setup import Feeds
from resnet_imagenet.train.snapshot import load_solverstate, rng_state
from resnet_imagenet.train.trainer import TrainOptions, load_rank_state, train

REPO = Path(__file__).resolve().parents[1]

NET = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 8 mirror: true mean_value: 128 scale: 0.0078125 }
  data_param { source: "train_lmdb" batch_size: %(batch)d backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 8 mean_value: 128 scale: 0.0078125 }
  data_param { source: "test_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
%(bn)s
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "accuracy@1" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy@1" }
"""
BN = """layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }"""

SOLVER = """net: "net.prototxt"
base_lr: %(lr)s
lr_policy: "step"
stepsize: 4
gamma: 0.5
momentum: 0.9
weight_decay: 0.001
max_iter: %(max_iter)d
display: 1
average_loss: 3
snapshot: %(snapshot)d
snapshot_prefix: "snap/tiny"
test_interval: 4
test_iter: 2
random_seed: 7
iter_size: %(iter_size)d
"""


def write_lmdb(path: Path, n: int, seed: int) -> None:
    """n raw 12x12 BGR Datum records in 3 classes: class c has a bright band in third c of the rows."""
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            label = i % 3
            img = rng.integers(0, 100, (12, 12, 3), dtype=np.uint8)
            img[label * 4 : label * 4 + 4] += 120
            txn.put(f"{i:08d}".encode(), encode_datum(img, label))
    env.close()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (cwd) with train/test LMDBs; returns a writer for net + solver prototxts."""
    write_lmdb(tmp_path / "train_lmdb", 32, 0)
    write_lmdb(tmp_path / "test_lmdb", 12, 1)
    monkeypatch.chdir(tmp_path)

    def write(name="solver.prototxt", batch=4, bn=False, lr="0.05", max_iter=8, snapshot=4, iter_size=1, extra=""):
        (tmp_path / "net.prototxt").write_text(NET % {"batch": batch, "bn": BN if bn else ""})
        text = SOLVER % {"lr": lr, "max_iter": max_iter, "snapshot": snapshot, "iter_size": iter_size}
        (tmp_path / name).write_text(text + extra)
        return name

    return write


def run(solver: str, caplog, **kw) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train(TrainOptions(solver=solver, workers=0, **kw)) == 0
    return [r.getMessage() for r in caplog.records]


def losses(lines: list[str], after: int = -1) -> list[tuple[int, str]]:
    """(iteration, line) for the display and output lines of iterations > after, timings stripped."""
    out, it = [], None
    for line in lines:
        m = re.match(r"Iteration (\d+) \(.*\), (loss = .*)", line)
        if m:
            it = int(m.group(1))
            line = m.group(2)
        elif not re.match(r"\s+(Train|Test) net output", line):
            continue
        if it is not None and it > after:
            out.append((it, line))
    return out


def test_caffe_log_lines_and_snapshot_pair(project, caplog):
    solver = project()
    lines = run(solver, caplog)
    text = "\n".join(lines)
    assert "Solving tiny" in text and "Learning Rate Policy: step" in text
    assert re.search(r"^Iteration 0 \([\d.e+-]+ iter/s, [\d.e+-]+s/1 iters\), loss = [\d.]+$", text, re.M)
    # caffe: outputs in name order (Net::Init's std::set), as the reference log's accuracy@1, accuracy@5, loss
    assert re.search(r"^    Train net output #0: accuracy@1 = [\d.]+$", text, re.M)
    assert re.search(r"^    Train net output #1: loss = [\d.]+ \(\* 1 = [\d.]+ loss\)$", text, re.M)
    assert "Iteration 4, lr = 0.025" in text  # step policy: 0.05 * 0.5^(4/4)
    assert "Iteration 4, Testing net (#0)" in text and "Iteration 0, Testing net (#0)" in text
    assert re.search(r"^    Test net output #0: accuracy@1 = [\d.]+$", text, re.M)
    assert "Snapshotting to binary proto file snap/tiny_iter_4.caffemodel" in text
    assert "Snapshotting solver state to binary proto file snap/tiny_iter_8.solverstate" in text
    assert "Optimization Done." in text
    assert sorted(p.name for p in Path("snap").iterdir()) == [
        "tiny_iter_4.caffemodel", "tiny_iter_4.solverstate", "tiny_iter_4.solverstate.resnet_imagenet.pt",
        "tiny_iter_8.caffemodel", "tiny_iter_8.solverstate", "tiny_iter_8.solverstate.resnet_imagenet.pt",
    ]  # fmt: skip
    # the solverstate is Caffe's SolverState: every field, as caffe_pb2 parses it
    state = caffe_pb2.SolverState.FromString(Path("snap/tiny_iter_8.solverstate").read_bytes())
    assert sorted(f.name for f, _ in state.ListFields()) == ["current_step", "history", "iter", "learned_net"]
    assert state.iter == 8 and state.learned_net == "snap/tiny_iter_8.caffemodel"  # as Caffe names it
    assert state.current_step == 1  # step policy, stepsize 4: the counter after iteration 7's lr
    learnable = [p for p in load_net("net.prototxt", phase="train").parameters()]
    assert [tuple(b.shape.dim) for b in state.history] == [tuple(p.shape) for p in learnable]  # SGD: one per blob
    assert all(len(b.data) == math.prod(b.shape.dim) and not b.diff for b in state.history)
    side = torch.load("snap/tiny_iter_8.solverstate.resnet_imagenet.pt", weights_only=True)
    assert (side["iter"], side["learned_net"], side["world_size"], side["solver_type"]) == (
        8, "tiny_iter_8.caffemodel", 1, "SGD"
    )  # fmt: skip
    # the caffemodel is Caffe's weights: load_net reads it back
    net = load_net("net.prototxt", weights="snap/tiny_iter_8.caffemodel", phase="test")
    assert net.layers["fc"].weight.abs().sum() > 0


def test_resume_is_exact(project, caplog):
    straight = run(project(max_iter=8), caplog)
    final = Path("snap/tiny_iter_8.caffemodel").read_bytes()
    # train to 5 (snapshot at 4, and at the end: 5), then resume from 5 to 8
    Path("snap").rename("snap_straight")
    run(project("first.prototxt", max_iter=5), caplog)
    resumed = run(project(max_iter=8), caplog, snapshot="snap/tiny_iter_5.solverstate")
    assert losses(resumed) and losses(resumed) == losses(straight, after=4)
    assert Path("snap/tiny_iter_8.caffemodel").read_bytes() == final
    # the whole SolverState but learned_net (another folder) is byte for byte the uninterrupted run's
    saved = caffe_pb2.SolverState.FromString(Path("snap_straight/tiny_iter_8.solverstate").read_bytes())
    again = caffe_pb2.SolverState.FromString(Path("snap/tiny_iter_8.solverstate").read_bytes())
    saved.learned_net = again.learned_net = ""
    assert saved.SerializeToString() == again.SerializeToString()


def test_resume_from_a_version_1_state_is_exact_and_from_a_caffe_state_goes_on(project, caplog):
    run(project(max_iter=8), caplog)
    final = Path("snap/tiny_iter_8.caffemodel").read_bytes()
    Path("snap").rename("snap_straight")
    run(project("first.prototxt", max_iter=5), caplog)
    state_path, side_path = (
        Path("snap/tiny_iter_5.solverstate"),
        Path("snap/tiny_iter_5.solverstate.resnet_imagenet.pt"),
    )
    proto = caffe_pb2.SolverState.FromString(state_path.read_bytes())
    side = torch.load(side_path, weights_only=True)
    # version 1 (before the sidecar): one torch zip of everything, under the solverstate's name
    history = [torch.tensor(b.data).reshape(tuple(b.shape.dim)) for b in proto.history]
    v1 = {k: v for k, v in side.items() if k not in ("format", "solver_type")}
    v1.update(format="resnet_imagenet.solverstate/1", solver={"type": "SGD", "history": history, "history2": []})
    torch.save(v1, state_path)
    side_path.unlink()
    run(project(max_iter=8), caplog, snapshot=str(state_path))
    assert Path("snap/tiny_iter_8.caffemodel").read_bytes() == final
    # Caffe's state (no sidecar): iteration, lr schedule and history go on; the data restarts, as Caffe's would
    state_path.write_bytes(proto.SerializeToString())
    text = "\n".join(run(project(max_iter=8), caplog, snapshot=str(state_path)))
    assert "no tiny_iter_5.solverstate.resnet_imagenet.pt beside it" in text
    assert "Iteration 5, lr = 0.025" in text and "Iteration 4, lr" not in text
    assert caffe_pb2.SolverState.FromString(Path("snap/tiny_iter_8.solverstate").read_bytes()).iter == 8


def test_iter_size_two_equals_double_batch(project, caplog):
    # caffe: iter_size accumulates gradients: 2 x batch 4 == 1 x batch 8 (net without BatchNorm)
    run(project(batch=8, max_iter=3, snapshot=0), caplog)
    big = load_net("net.prototxt", weights="snap/tiny_iter_3.caffemodel", phase="test")
    run(project(batch=4, max_iter=3, snapshot=0, iter_size=2), caplog)
    acc = load_net("net.prototxt", weights="snap/tiny_iter_3.caffemodel", phase="test")
    for (_, _, a, _, _), (_, _, b, _, _) in zip(big.learnable(), acc.learnable()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_nan_loss_stops_and_keeps_last_snapshot(project, capsys):
    solver = project(lr="1e30", max_iter=20, snapshot=1)
    assert cli_main(["train", "--solver", solver, "--workers", "0"]) == 3
    err = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert len(err) == 1
    m = re.match(
        r"resnet-imagenet train: error: Iteration (\d+), loss = (nan|inf|-inf): .*last good snapshot: (\S+)", err[0]
    )
    assert m, err
    it = int(m.group(1))
    assert it < 20 and m.group(3) == f"snap/tiny_iter_{it}.solverstate"
    assert not Path(f"snap/tiny_iter_{it + 1}.solverstate").exists()
    assert load_solverstate(m.group(3), 20).iter == it  # the last snapshot is intact


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--solver", "missing.prototxt"], "missing.prototxt"),
        (["--solver", "solver.prototxt", "--gpu", "7"], "GPU 7 does not exist"),
        (["--solver", "solver.prototxt", "--weights", "wrong.caffemodel"], "shape mismatch"),
        (["--solver", "solver.prototxt", "--snapshot", "x.solverstate"], "x.solverstate"),
        (["--solver", "nolmdb.prototxt"], "elsewhere_lmdb"),
    ],
)
def test_bad_input_is_one_line(project, capsys, args, msg):
    project()
    Path("nolmdb.prototxt").write_text(Path("solver.prototxt").read_text().replace("net.prototxt", "net2.prototxt"))
    Path("net2.prototxt").write_text(Path("net.prototxt").read_text().replace('"train_lmdb"', '"elsewhere_lmdb"'))
    wrong = load_net("net.prototxt", phase="test")
    wrong.layers["fc"].weight = torch.nn.Parameter(torch.zeros(5, 144))
    wrong.save_caffemodel("wrong.caffemodel")
    assert cli_main(["train", *args, "--workers", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert not Path("snap").exists()


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "resnet_imagenet", "train", "--gpu", f"cpu:{nproc}", "--workers", "0", *args]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_two_processes_equal_one_with_double_batch(project, caplog, tmp_path):
    run(project(batch=8, max_iter=3, snapshot=0), caplog)
    one = load_net("net.prototxt", weights="snap/tiny_iter_3.caffemodel", phase="test")
    project(batch=4, max_iter=3, snapshot=0)
    torchrun(2, "--solver", "solver.prototxt", cwd=tmp_path)
    two = load_net("net.prototxt", weights="snap/tiny_iter_3.caffemodel", phase="test")
    for (_, _, a, _, _), (_, _, b, _, _) in zip(one.learnable(), two.learnable()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_snapshot_write_failure_stops_every_process(project, tmp_path):
    """Rank 0 cannot write a snapshot (here: a folder in the way): both ranks stop at once, with one clear line."""
    project(max_iter=8, snapshot=4)
    Path("snap/tiny_iter_4.caffemodel").mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "resnet_imagenet",
           "train", "--gpu", "cpu:2", "--workers", "0", "--solver", "solver.prototxt"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("resnet-imagenet train: error: snapshot")]
    assert len(errors) == 2, r.stderr[-3000:]  # one line per rank, no traceback
    assert any("snap/tiny_iter_4.caffemodel" in ln for ln in errors), errors
    assert not Path("snap/tiny_iter_4.solverstate").exists() and not Path("snap/tiny_iter_8.solverstate").exists()


def log_messages(stderr: str) -> list[str]:
    """The messages of glog-prefixed lines (``I1125 20:31:48.952993 8748 train.py:166] msg``)."""
    return [m.group(1) for m in re.finditer(r"^[IWE]\d{4} [\d:.]+ \d+ \S+:\d+\] (.*)$", stderr, re.M)]


@pytest.mark.slow
def test_two_processes_resume_is_exact(project, tmp_path):
    project(max_iter=6, snapshot=3)
    straight = log_messages(torchrun(2, "--solver", "solver.prototxt", cwd=tmp_path).stderr)
    Path("snap").rename("snap_straight")
    Path("snap").mkdir()
    for ext in ("caffemodel", "solverstate", "solverstate.resnet_imagenet.pt"):
        Path(f"snap_straight/tiny_iter_3.{ext}").rename(f"snap/tiny_iter_3.{ext}")
    resumed = log_messages(torchrun(2, "--solver", "solver.prototxt", "--snapshot", "snap/tiny_iter_3.solverstate",
                                    cwd=tmp_path).stderr)  # fmt: skip
    assert losses(resumed) and losses(resumed) == losses(straight, after=2)
    assert Path("snap/tiny_iter_6.caffemodel").read_bytes() == Path("snap_straight/tiny_iter_6.caffemodel").read_bytes()


@pytest.mark.slow
def test_sighup_snapshots_and_sigint_stops(project, tmp_path):
    import signal

    solver = project(max_iter=100000, snapshot=0)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "resnet_imagenet", "train", "--solver", solver, "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        sent_hup = sent_int = False
        for line in proc.stderr:
            seen.append(line)
            if not sent_hup and "Iteration 3 (" in line:
                proc.send_signal(signal.SIGHUP)
                sent_hup = True
            elif sent_hup and not sent_int and "Snapshotting solver state" in line:
                proc.send_signal(signal.SIGINT)
                sent_int = True
        assert proc.wait(timeout=60) == 0, "".join(seen[-20:])
    finally:
        proc.kill()
    text = "".join(seen)
    assert "Optimization stopped early." in text
    states = sorted(Path("snap").glob("*.solverstate"), key=lambda p: int(p.stem.split("_")[-1]))
    assert len(states) == 2, states
    first, last = (int(p.stem.split("_")[-1]) for p in states)
    assert 3 < first < last < 100000  # SIGHUP went on training; SIGINT snapshotted and stopped
    assert caffe_pb2.SolverState.FromString(states[-1].read_bytes()).iter == last
    assert text.count(f"tiny_iter_{last}.caffemodel") == 1  # the stop's snapshot is written once


@pytest.mark.slow
def test_sync_bn_two_processes_equal_one_with_double_batch(project, caplog, tmp_path):
    # with --sync-bn the batch statistics span both processes: the same as one process with batch 2B
    run(project(batch=8, bn=True, max_iter=3, snapshot=0), caplog)
    one = load_net("net.prototxt", weights="snap/tiny_iter_3.caffemodel", phase="test")
    project(batch=4, bn=True, max_iter=3, snapshot=0)
    torchrun(2, "--solver", "solver.prototxt", "--sync-bn", cwd=tmp_path)
    two = load_net("net.prototxt", weights="snap/tiny_iter_3.caffemodel", phase="test")
    for name in ("conv1", "bn1", "scale1", "fc"):
        for a, b in zip(one.layers[name].blobs(), two.layers[name].blobs()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def train_sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run([str(REPO / "train.sh"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_train_sh_bad_input_fails_before_starting(project, tmp_path):
    project()
    Path("tiny").mkdir()
    Path("tiny/tiny_solver.prototxt").write_text(Path("solver.prototxt").read_text())
    for args, msg in [
        (("99", "tiny", "tiny_"), "GPU 99 does not exist"),
        (("cpu", "tiny", "other_"), "tiny/other_solver.prototxt: no such solver"),
        (("cpu", "nonet", "tiny_"), "no net folder prototxt_like/nonet"),
        (("cpu:0", "tiny", "tiny_"), "expected cpu:N"),
    ]:
        r = train_sh(*args, cwd=tmp_path)
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, (args, r.stderr)
    assert not Path("logs").exists() and not Path("snap").exists()


def test_final_test_scores_the_saved_snapshot(project, caplog):
    """The last display's extra TRAIN forward must not move BatchNorm statistics past the snapshot."""
    lines = run(project(bn=True, max_iter=8, snapshot=8), caplog)
    final = [ln for ln in lines if re.match(r"\s+Test net output #1: loss", ln)][-1]
    logged = float(re.search(r"loss = (\S+)", final).group(1))
    net = load_net("net.prototxt", weights="snap/tiny_iter_8.caffemodel", phase="test")
    feed = DataFeed(net.data_layers[0], TEST, num_workers=0)
    for _ in range(4):  # the passes at iterations 0 and 4 (test_initialization, test_interval 4) came first
        feed.next()
    with torch.no_grad():
        mean_loss = sum(net(*feed.next())["loss"].item() for _ in range(2)) / 2
    feed.close()
    assert mean_loss == pytest.approx(logged, rel=1e-5)


ONE_LAYER = """name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 4 } data_param { source: "%s" batch_size: 4 backend: LMDB }"""


def test_resume_with_another_process_count_goes_on_from_the_global_position(tmp_path, caplog):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i in range(32):
            txn.put(f"{i:08d}".encode(), encode_datum(np.full((6, 6, 3), i, np.uint8), i % 3))
    env.close()
    lp = parse_text(ONE_LAYER % (tmp_path / "db"), caffe_pb2.LayerParameter())

    def feed(rank: int, world: int) -> DataFeed:
        return DataFeed(lp, TRAIN, rank=rank, world_size=world, seed=7, num_workers=0)

    old = [feed(r, 2) for r in range(2)]
    for f in old:
        for _ in range(3):  # 2 ranks x 3 batches x 4: 24 of the epoch's 32 samples taken
            f.next()
    state = {
        "seed": 7,
        "world_size": 2,
        "train_feeds": [[f.state_dict()] for f in old],
        "test_feeds": [],
        "rng": [rng_state()] * 2,
    }
    randoms = []
    for rank, world, index in ((0, 1, 24), (0, 4, 6), (1, 4, 6)):
        new = feed(rank, world)
        with caplog.at_level("WARNING"):
            load_rank_state(state, Feeds([(new, ["data", "label"])]), rank=rank, world_size=world)
        assert (new.state_dict()["epoch"], new.state_dict()["index"]) == (0, index)
        assert "not those of an uninterrupted run" in caplog.text
        randoms.append(torch.rand(4))
        new.close()
    torch.manual_seed(7)
    assert torch.equal(randoms[1], torch.rand(4))  # rank r's streams start from seed + r, as in a fresh run
    torch.manual_seed(8)
    assert torch.equal(randoms[2], torch.rand(4))
    for f in old:
        f.close()


def test_train_flags_default_to_train_options():
    args = build_parser("train").parse_args(["train", "--solver", "s.prototxt"])
    assert {f.name: getattr(args, f.name) for f in fields(TrainOptions)} == asdict(TrainOptions(solver="s.prototxt"))
    flags = ["--no-amp", "--no-channels-last", "--no-cudnn-benchmark", "--sync-bn", "--check", "--gpu", "cpu:2"]
    args = build_parser("train").parse_args(["train", "--solver", "s", *flags, "--sigint-effect", "none"])
    got = (args.amp, args.channels_last, args.cudnn_benchmark, args.sync_bn, args.check, args.gpu, args.sigint_effect)
    assert got == (False, False, False, True, True, "cpu:2", "none")


def test_train_help_imports_no_torch():
    code = "import sys; from resnet_imagenet import cli; cli.build_parser('train'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_the_solvers_own_weights_field_fine_tunes_as_caffe(project, caplog):
    """SolverParameter.weights (caffe.cpp train: used unless --weights replaces or --snapshot clears it)."""
    run(project(), caplog)  # snap/tiny_iter_8.caffemodel
    source = load_net("net.prototxt", weights="snap/tiny_iter_8.caffemodel", phase="train")
    project(name="ft.prototxt", lr="0", max_iter=2, snapshot=2, extra='weights: "snap/tiny_iter_8.caffemodel"\n')
    assert cli_main(["train", "--solver", "ft.prototxt", "--gpu", "cpu", "--workers", "0"]) == 0
    tuned = load_net("net.prototxt", weights="snap/tiny_iter_2.caffemodel", phase="train")
    for (name, a), (_, b) in zip(source.state_dict().items(), tuned.state_dict().items()):
        assert torch.equal(a, b), name  # base_lr 0: the solver's weights, unchanged (not the fillers)
    fresh = load_net("net.prototxt", phase="train")
    assert not torch.equal(fresh.layers["fc"].weight, tuned.layers["fc"].weight)
    project(name="bad.prototxt", max_iter=2, snapshot=2, extra='weights: "no_such.caffemodel"\n')
    assert cli_main(["train", "--solver", "bad.prototxt", "--gpu", "cpu", "--workers", "0"]) != 0
