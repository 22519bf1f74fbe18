"""Training faults with real processes and signals: a loss stuck at the cap, SIGTERM, a dead launcher, NaN on
two ranks, absurd sizes, bad records, a frozen peer."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from resnet_imagenet.cli import main as cli_main
from resnet_imagenet.data.datum import encode_datum

REPO = Path(__file__).resolve().parents[1]

NET = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 8 mean_value: 128 scale: 0.0078125 }
  data_param { source: "train_lmdb" batch_size: 8 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: %(classes)s weight_filler { type: "gaussian" std: %(std)s } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""

SOLVER = """net: "net.prototxt"
base_lr: %(lr)s
lr_policy: "fixed"
momentum: 0.9
max_iter: %(max_iter)d
display: 1
snapshot: %(snapshot)d
snapshot_prefix: "snap/tiny"
random_seed: 7
"""


def write_lmdb(path: Path, n: int, classes: int = 10, seed: int = 0, odd: dict | None = None) -> None:
    """n raw 12x12 records, label i % classes; ``odd`` maps a record number to (label, size) instead."""
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            label, size = (odd or {}).get(i, (i % classes, 12))
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            txn.put(f"{i:08d}".encode(), encode_datum(img, label))
    env.close()


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A project folder (cwd) with a 10-class train LMDB; returns a writer of net + solver."""
    write_lmdb(tmp_path / "train_lmdb", 64)
    monkeypatch.chdir(tmp_path)

    def write(lr="0.01", max_iter=20, snapshot=0, std="0.1", classes="10") -> str:
        (tmp_path / "net.prototxt").write_text(NET % {"std": std, "classes": classes})
        (tmp_path / "solver.prototxt").write_text(SOLVER % {"lr": lr, "max_iter": max_iter, "snapshot": snapshot})
        return "solver.prototxt"

    return write


def env(**kw: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **kw)


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "resnet_imagenet", "train", "--gpu", f"cpu:{nproc}", "--workers", "0", *args]  # fmt: skip


def errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("resnet-imagenet train: error:")]


# -- 1. a loss stuck at the cap ----------------------------------------------------------------------


def test_loss_stuck_at_the_cap_stops_training(tiny, capsys):
    """Exploded but finite logits (fc std 1e4, lr 0): ~90% of the items sit at 87.3365 -> stop at iteration 9."""
    solver = tiny(lr="0", std="1e4", max_iter=100, snapshot=5)
    assert cli_main(["train", "--solver", solver, "--workers", "0"]) == 3
    err = errors(capsys.readouterr().err)
    assert len(err) == 1, err
    assert re.match(
        r"resnet-imagenet train: error: Iteration 9, loss = [0-9.]+: at least 50% of the loss items at the cap "
        r"-log\(FLT_MIN\) = 87.3365 for 10 iterations: the logits diverged, stopping; "
        r"last good snapshot: snap/tiny_iter_5.solverstate$",
        err[0],
    ), err
    loss = float(re.search(r"loss = ([0-9.]+)", err[0]).group(1))
    assert 60 < loss <= 87.3366  # Caffe's value: nothing cancels to ~0


def test_healthy_loss_is_not_stuck(tiny, capsys):
    assert cli_main(["train", "--solver", tiny(max_iter=12), "--workers", "0"]) == 0


# -- 9. SIGTERM, a dead launcher ------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_and_wait_for(cmd: list[str], cwd: Path, text: str, **kw) -> tuple[subprocess.Popen, list[str]]:
    """Start ``cmd`` and read its stderr until a line contains ``text``."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(**kw), stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return proc, seen
    proc.kill()
    raise AssertionError("".join(seen[-30:]))


def stop_iters(folder: Path = Path("snap")) -> list[int]:
    return sorted(int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("*.solverstate"))


@pytest.mark.slow
@pytest.mark.parametrize("effect", ["stop", "snapshot", "none"])
def test_sigterm_effect(tiny, tmp_path, effect):
    """SIGTERM: stop = snapshot and exit 0; snapshot = snapshot and go on; none = ignored. (A second SIGTERM-free
    way out is SIGINT, sent after the effect is seen.)"""
    tiny(max_iter=100000)
    cmd = [sys.executable, "-m", "resnet_imagenet", "train", "--solver", "solver.prototxt", "--workers", "0"]
    proc, seen = start_and_wait_for([*cmd, "--sigterm-effect", effect], tmp_path, "Iteration 3 (")
    try:
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        if effect != "stop":
            for line in proc.stderr:  # it goes on: 30 more iterations, then Ctrl-C
                seen.append(line)
                m = re.search(r"Iteration (\d+) \(", line)
                if m and int(m.group(1)) > 40:
                    break
            proc.send_signal(signal.SIGINT)
        seen += proc.stderr.readlines()
        assert proc.wait(timeout=30) == 0, "".join(seen[-20:])
        assert effect != "stop" or time.monotonic() - t0 < 10
    finally:
        proc.kill()
    text = "".join(seen)
    assert "Optimization stopped early." in text
    iters = stop_iters()
    assert len(iters) == (2 if effect == "snapshot" else 1), iters
    assert (iters[0] < 20) == (effect != "none")  # the SIGTERM's snapshot, at once (not after 40 iterations)


@pytest.mark.slow
def test_torchrun_sigterm_snapshots_and_kill9_of_torchrun_stops_the_trainers(tiny, tmp_path):
    tiny(max_iter=100000)
    # SIGTERM to torchrun: it passes it on, both trainers stop at the same iteration, rank 0 snapshots
    proc, seen = start_and_wait_for(torchrun_cmd(2, "--solver", "solver.prototxt"), tmp_path, "Iteration 3 (")
    try:
        proc.send_signal(signal.SIGTERM)
        seen += proc.stderr.readlines()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert "".join(seen).count("Optimization stopped early.") == 1, "".join(seen[-20:])
    (first,) = stop_iters()
    # kill -9 of torchrun: the trainers notice their launcher is gone, snapshot and stop
    proc, seen = start_and_wait_for(torchrun_cmd(2, "--solver", "solver.prototxt"), tmp_path, "Iteration 3 (")
    try:
        trainers = children(proc.pid)
        assert len(trainers) == 2
        proc.kill()
        t0 = time.monotonic()
        seen += proc.stderr.readlines()  # EOF: every trainer has closed its stderr (exited)
        while any(alive(p) for p in trainers) and time.monotonic() - t0 < 20:
            time.sleep(0.1)
        assert not any(alive(p) for p in trainers) and time.monotonic() - t0 < 20
    finally:
        for p in children(proc.pid) + trainers:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    text = "".join(seen)
    assert f"the launcher (pid {proc.pid}) is gone: stopping" in text, text[-3000:]
    assert "Optimization stopped early." in text
    assert len(stop_iters()) == 2 and stop_iters()[0] == first


# -- 5. NaN on two ranks: one message, naming the last good snapshot ----------------------------------


@pytest.mark.slow
def test_nan_on_two_ranks_is_one_message_naming_the_last_snapshot(tiny, tmp_path):
    tiny(lr="1e30", max_iter=20, snapshot=1)
    r = subprocess.run(torchrun_cmd(2, "--solver", "solver.prototxt"), cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0
    err = errors(r.stderr)
    assert len(err) == 1, r.stderr[-3000:]
    m = re.search(r"Iteration (\d+), loss = (nan|inf|-inf): .*last good snapshot: (\S+)$", err[0])
    assert m, err
    assert m.group(3) == f"snap/tiny_iter_{m.group(1)}.solverstate" and Path(m.group(3)).is_file()
    assert "last good snapshot: none" not in r.stderr


# -- 8. absurd sizes are refused before anything is allocated ----------------------------------------


def test_absurd_num_output_is_refused_in_one_line_before_allocating(tiny, capsys):
    solver = tiny(classes="2000000000")  # 2e9 x 144 weights: 1.2 TB in fp32
    t0 = time.monotonic()
    assert cli_main(["train", "--solver", solver, "--workers", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.match(
        r"resnet-imagenet train: error: net 'tiny' needs about [0-9.e+]+ GB \(2\.9e\+11 parameters, .*"
        r"the largest layer 'fc' has 2\.9e\+11 parameters\), more than the [0-9.e+]+ GB of this machine's memory",
        err[0],
    ), err
    assert time.monotonic() - t0 < 20
    assert not Path("snap").exists()


def test_max_memory_flag_sets_the_limit(tiny, capsys):
    solver = tiny(classes="100000")  # 14.4e6 fc weights: 4 x 4 x 14.4e6 bytes = 0.21 GiB with history
    assert cli_main(["train", "--solver", solver, "--workers", "0", "--check", "--max-memory", "0.1"]) == 1
    assert "more than the 0.1 GB of --max-memory" in capsys.readouterr().err
    assert cli_main(["train", "--solver", solver, "--workers", "0", "--check", "--max-memory", "1"]) == 0


# -- 3. bad records: labels out of range, odd sizes, smashed pages ------------------------------------


@pytest.mark.parametrize("label", [10, -1])
def test_label_outside_num_output_is_one_line_naming_db_and_record(tiny, capsys, label):
    tiny()
    shutil.rmtree("train_lmdb")
    write_lmdb(Path("train_lmdb"), 64, odd={37: (label, 12)})
    assert cli_main(["train", "--solver", "solver.prototxt", "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"resnet-imagenet train: error: {Path.cwd() / 'train_lmdb'}: record 37 has label {label}, outside 0..9 of "
        "layer 'loss' (10 classes in 'fc')"
    ), err[-3:]
    assert not any("Traceback" in ln or "IndexError" in ln for ln in err)


def test_check_reads_the_label_range_recorded_at_build(tiny, tmp_path, capsys):
    from _images import smooth_image, write_images

    rng = np.random.default_rng(0)
    names = write_images(tmp_path / "img", [smooth_image(rng, 12, 12) for _ in range(11)])
    (tmp_path / "list.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))  # labels 0..10
    shutil.rmtree("train_lmdb")
    args = ["--no-progress", "--jobs", "1", str(tmp_path / "img"), str(tmp_path / "list.txt"), "train_lmdb"]
    assert cli_main(["convert_imageset", *args]) == 0
    solver = tiny()
    capsys.readouterr()
    assert cli_main(["train", "--solver", solver, "--check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(  # train/preflight.py: the classifier, before the feeds are built
        "train_lmdb (labels 0..10 in its resnet_imagenet_meta.json); set num_output: 11"
    ), err


def test_odd_sized_record_with_a_full_size_mean_file_is_skipped(tiny, capsys):
    from resnet_imagenet.proto.blob import write_blobproto

    shutil.rmtree("train_lmdb")
    write_lmdb(Path("train_lmdb"), 64, odd={5: (5, 14)})  # one 3x14x14 among 3x12x12
    write_blobproto(np.full((1, 3, 12, 12), 128, np.float32), Path("mean.binaryproto"))
    solver = tiny(max_iter=12)
    Path("net.prototxt").write_text(
        Path("net.prototxt").read_text().replace("mean_value: 128", 'mean_file: "mean.binaryproto"')
    )
    assert cli_main(["train", "--solver", solver, "--workers", "0"]) == 0  # 12 x 8 = 96 > 64: record 5 came up
    assert (
        "record 5 skipped: it is 14x14, not 12x12 (the size of mean_file mean.binaryproto)" in capsys.readouterr().err
    )


def test_smashed_lmdb_pages_are_one_line_naming_the_db(tiny, capsys):
    solver = tiny()
    data = Path("train_lmdb/data.mdb")
    raw = bytearray(data.read_bytes())
    raw[2 * 4096 :] = b"\xa5" * (len(raw) - 2 * 4096)  # every page after the two meta pages
    data.write_bytes(bytes(raw))
    assert cli_main(["train", "--solver", solver, "--workers", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_lmdb: the LMDB is corrupt" in err[0], err


def test_lmdb_smashed_while_training_is_one_line_naming_the_db(tmp_path):
    from resnet_imagenet.data.feed import DataFeed
    from resnet_imagenet.proto import caffe_pb2
    from resnet_imagenet.proto.text import parse_text

    write_lmdb(tmp_path / "db", 64)
    lp = parse_text(
        'name: "d" type: "Data" top: "data" top: "label" data_param { source: "db" batch_size: 4 }',
        caffe_pb2.LayerParameter(),
    )
    with DataFeed(lp, "train", num_workers=1, base_dir=tmp_path) as feed:
        feed.next()
        data = tmp_path / "db" / "data.mdb"
        raw = bytearray(data.read_bytes())
        raw[2 * 4096 :] = b"\xa5" * (len(raw) - 2 * 4096)
        with open(data, "r+b") as f:  # in place: the readers' maps see it
            f.write(bytes(raw))
        with pytest.raises(ValueError, match=r"db: the LMDB is corrupt at record \d+") as e:
            for _ in range(40):
                feed.next()
    assert "\n" not in str(e.value)


# -- 4. a frozen peer -----------------------------------------------------------------------------------


def rank_of(pid: int) -> int:
    env_vars = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env_vars if v.startswith(b"RANK=")).split(b"=")[1])


@pytest.mark.slow
def test_frozen_peer_is_named_and_the_run_ends_in_seconds(tiny, tmp_path):
    tiny(max_iter=100000)
    kw = {"RESNET_IMAGENET_PEER_TIMEOUT": "3", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"}
    proc, seen = start_and_wait_for(torchrun_cmd(2, "--solver", "solver.prototxt"), tmp_path, "Iteration 3 (", **kw)
    trainers = children(proc.pid)
    try:
        assert len(trainers) == 2
        frozen = next(p for p in trainers if rank_of(p) == 1)
        live = next(p for p in trainers if p != frozen)
        os.kill(frozen, signal.SIGSTOP)  # a hung node: alive, silent
        t0 = time.monotonic()
        while alive(live) and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        noticed = time.monotonic() - t0
        seen += proc.stderr.readlines()
        proc.wait(timeout=90)
        took = time.monotonic() - t0
    finally:
        for p in trainers:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        proc.kill()
    err = errors("".join(seen))
    assert proc.returncode != 0
    assert any(
        re.match(
            r"resnet-imagenet train: error: rank 1 stopped answering: no heartbeat for \d+ s "
            r"\(RESNET_IMAGENET_PEER_TIMEOUT=3 s\); rank 0 stopping$",
            e,
        )  # fmt: skip
        for e in err
    ), "".join(seen[-30:])
    assert noticed < 15, noticed  # rank 0: 3 s without a heartbeat, on a busy machine
    # torchrun then waits 30 s (fixed, after a failed worker) before it SIGKILLs the frozen rank
    assert took < 75, took
    time.sleep(0.5)
    assert not any(alive(p) for p in trainers)


def test_pg_timeout_default_and_variables(monkeypatch):
    from resnet_imagenet.train.dist import pg_timeout
    from resnet_imagenet.train.heartbeat import peer_timeout

    monkeypatch.delenv("RESNET_IMAGENET_PG_TIMEOUT", raising=False)
    monkeypatch.delenv("RESNET_IMAGENET_DIST_TIMEOUT_MIN", raising=False)
    monkeypatch.delenv("RESNET_IMAGENET_PEER_TIMEOUT", raising=False)
    assert pg_timeout().total_seconds() == 1800 and peer_timeout() == 120
    monkeypatch.setenv("RESNET_IMAGENET_DIST_TIMEOUT_MIN", "90")
    assert pg_timeout().total_seconds() == 5400
    monkeypatch.setenv("RESNET_IMAGENET_PG_TIMEOUT", "7200")
    assert pg_timeout().total_seconds() == 7200
