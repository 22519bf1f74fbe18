"""Figure: training throughput -- `resnet-imagenet train` img/s with AMP (bf16/fp16, channels_last) vs fp32.

A synthetic ImageNet-shaped raw LMDB (256x256 BGR, random classes) feeds the zoo's TRAIN net (resnet_50
by default, its per-GPU batch 32) for --iters iterations on GPU 0; the rate is the median of the
``Speed: X images/s`` lines after the first display (warm-up, cudnn.benchmark). The baseline is the
same run with --no-amp --no-channels-last. Prints both rates and the ratio. Without a GPU it runs on
the CPU only for --quick or --net resnet_tiny (AMP off in both runs: the ratio is ~1).
NVIDIA's ResNet-50 reaches ~2,470 img/s on one A100 with AMP.
Usage: python benchmarks/bench_train.py [--net resnet_50] [--iters 200] [--n 1024] [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lmdb  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from resnet_imagenet.data.datum import encode_datum  # noqa: E402
from resnet_imagenet.proto.text import read_net, read_solver, to_text  # noqa: E402


def make_lmdb(path: Path, n: int, size: int, classes: int) -> None:
    rng = np.random.default_rng(0)
    env = lmdb.open(str(path), map_size=n * (3 * size * size + 1024) + (1 << 24))
    with env.begin(write=True) as txn:
        for i in range(n):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            txn.put(f"{i:08d}".encode(), encode_datum(img, int(rng.integers(classes))))
    env.close()


def prepare(work: Path, net_name: str, n: int, iters: int, display: int) -> Path:
    """A copy of the zoo net and solver reading the synthetic LMDB: no test, no snapshots."""
    net = read_net(ROOT / "prototxt_like" / net_name / "train_val.prototxt")
    train_layers = [lp for lp in net.layer if lp.type == "Data" and any(r.phase == 0 for r in lp.include)]
    lp = train_layers[0]
    crop = lp.transform_param.crop_size
    classes = next(x.inner_product_param.num_output for x in reversed(net.layer) if x.type == "InnerProduct")
    db = work / "train_lmdb"
    if not db.exists():
        make_lmdb(db, n, crop + crop // 7, classes)  # 256 for crop 224
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.source = str(db)
            layer.transform_param.ClearField("mean_file")
            layer.transform_param.ClearField("mean_value")
            layer.transform_param.mean_value.extend([104, 117, 123])
    (work / "train_val.prototxt").write_text(to_text(net))
    sp = read_solver(ROOT / "prototxt_like" / net_name / f"{net_name}_solver.prototxt")
    sp.net = str(work / "train_val.prototxt")
    sp.max_iter, sp.display, sp.average_loss = iters, display, display
    sp.test_interval, sp.snapshot, sp.snapshot_after_train = 0, 0, False
    sp.ClearField("test_iter")
    sp.snapshot_prefix = str(work / "snap")
    (work / "solver.prototxt").write_text(to_text(sp))
    return work / "solver.prototxt"


def run(solver: Path, gpu: str, flags: list[str], workers: int) -> float:
    cmd = [sys.executable, "-m", "resnet_imagenet", "train", "--solver", str(solver), "--gpu", gpu]
    cmd += ["--workers", str(workers), *flags]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"train failed:\n{r.stderr[-3000:]}")
    rates = [float(x) for x in re.findall(r"Speed: ([\d.]+) images/s", r.stderr)]
    if not rates:
        raise SystemExit(f"no Speed lines in the log:\n{r.stderr[-3000:]}")
    later = rates[1:] or rates
    return statistics.median(later)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="resnet_50", help="a folder under prototxt_like/")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--n", type=int, default=1024, help="images in the synthetic LMDB")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--quick", action="store_true", help="resnet_tiny, a few iterations (checks the script runs)")
    ap.add_argument("--workdir", help="keep the LMDB here (default: a temporary folder)")
    a = ap.parse_args()
    if a.quick:
        a.net, a.iters, a.n, a.workers = "resnet_tiny", 6, 64, 0
    display = max(1, a.iters // 10)
    gpu = "0" if torch.cuda.is_available() else "cpu"
    if gpu == "cpu" and not a.quick and a.net != "resnet_tiny":
        # ResNet-50 at batch 32 takes ~8 s a step on 2 CPU cores: the figure is a GPU one
        print("bench_train: skipped: no GPU (AMP is GPU-only; --quick or --net resnet_tiny runs on the CPU)")
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        solver = prepare(work, a.net, a.n, a.iters, display)
        amp = run(solver, gpu, [], a.workers)
        fp32 = run(solver, gpu, ["--no-amp", "--no-channels-last"], a.workers)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    dev = torch.cuda.get_device_name(0) if gpu == "0" else "CPU"
    print(f"train {a.net} on {dev}, {a.iters} iterations, batch from the prototxt")
    print(f"  AMP + channels_last : {amp:9.1f} img/s")
    print(f"  fp32 (--no-amp)     : {fp32:9.1f} img/s")
    print(f"  ratio AMP / fp32    : {amp / fp32:9.2f}x")


if __name__ == "__main__":
    main()
