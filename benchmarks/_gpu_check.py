"""The Python steps of benchmarks/gpu_check.sh: the synthetic LMDB, the training folder, log parsing, the report.

python benchmarks/_gpu_check.py env OUT.json [--cpu-ok]           # device name, versions; fails without CUDA
python benchmarks/_gpu_check.py lmdb DB N CROP CLASSES [JOBS]     # N photo-like JPEGs, shorter side CROP*8/7
python benchmarks/_gpu_check.py prepare WORK NET DB ITERS         # WORK/gpucheck_solver.prototxt for train.sh
python benchmarks/_gpu_check.py train-log LOG OUT.json            # img/s and data wait from Speed lines
python benchmarks/_gpu_check.py pytest-log LOG OUT.json           # pytest's counts
python benchmarks/_gpu_check.py time-log LOG OUT.json BATCH       # `time`'s averages
python benchmarks/_gpu_check.py prune DEVICE BATCH REPS OUT.json  # bench_prune's pruned-net forward speed-up
python benchmarks/_gpu_check.py report DIR OUT.json               # one JSON + the BENCHMARKS.md rows
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def _write(path: str, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")
    print(json.dumps(obj))


def env(out: str, cpu_ok: bool = False) -> int:
    """The machine's facts; exit 1 with one line when torch sees no GPU (unless ``cpu_ok``)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not cpu_ok:
        print(
            f"gpu_check: error: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU "
            "(torch.cuda.is_available() is False); CPU_OK=1 or --dry-run runs the steps on the CPU",
            file=sys.stderr,
        )
        return 1
    facts = {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU (dry run)",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    _write(out, facts)
    return 0


def _jpeg(args: tuple[int, int]) -> bytes:
    import cv2
    import numpy as np
    from _synth import photo_like

    i, short = args
    rng = np.random.default_rng(i)
    long = int(short * rng.uniform(1.0, 1.4))
    h, w = (short, long) if i % 3 else (long, short)
    ok, buf = cv2.imencode(".jpg", photo_like(rng, h, w), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return buf.tobytes()


def make_lmdb(db: str, n: int, crop: int, classes: int, jobs: int = 0) -> int:
    """An ImageNet-shaped encoded LMDB: n photo-like JPEGs, shorter side crop*8/7 (256 for 224), labels i % classes."""
    import lmdb

    from resnet_imagenet.data.datum import encode_datum

    t0 = time.perf_counter()
    short = crop * 8 // 7
    with multiprocessing.Pool(jobs or os.cpu_count()) as pool:
        jpegs = pool.map(_jpeg, [(i, short) for i in range(n)], chunksize=16)
    env = lmdb.open(db, map_size=sum(map(len, jpegs)) * 2 + (1 << 26))
    with env.begin(write=True) as txn:
        for i, jpg in enumerate(jpegs):
            txn.put(b"%08d_%06d.JPEG" % (i, i), encode_datum(jpg, i % classes, encoded=True))
    env.close()
    kb = sum(map(len, jpegs)) / n / 1e3
    print(f"gpu_check: {n} JPEGs (shorter side {short}, {kb:.1f} kB each) in {db}, {time.perf_counter() - t0:.1f} s")
    return 0


def prepare(work: str, net: str, db: str, iters: int) -> int:
    """WORK/train_val.prototxt reading DB, WORK/gpucheck_solver.prototxt: ITERS iterations, no test or snapshot."""
    from bench_train import prepare as bench_prepare

    w = Path(work)
    w.mkdir(parents=True, exist_ok=True)
    link = w / "train_lmdb"
    if not link.exists():
        link.symlink_to(Path(db).resolve())
    solver = bench_prepare(w, net, 0, iters, max(1, iters // 6))
    solver.rename(w / "gpucheck_solver.prototxt")
    return 0


def train_log(log: str, out: str) -> int:
    """The Speed lines of a train.sh log: the median img/s and data wait after the first display (warm-up)."""
    text = Path(log).read_text(errors="replace")
    rows = re.findall(r"Speed: ([\d.]+) images/s \((\d+) per iteration\), ETA \S+, data wait ([\d.]+)%", text)
    if not rows:
        print(f"gpu_check: error: {log}: no Speed lines", file=sys.stderr)
        return 1
    later = rows[1:] or rows
    amp = re.search(r"AMP (off|bf16|fp16 with a gradient scaler), channels_last (\w+)", text)
    result = {
        "img_s": statistics.median(float(r[0]) for r in later),
        "data_wait_pct": statistics.median(float(r[2]) for r in later),
        "batch": int(rows[0][1]),
        "displays": len(rows),
        "iterations": max((int(x) for x in re.findall(r"Iteration (\d+) \(", text)), default=0),
        "precision": amp.group(0) if amp else "AMP off (CPU)",
        "log": log,
    }
    _write(out, result)
    return 0


def pytest_log(log: str, out: str) -> int:
    """pytest's closing counts."""
    text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    result = {k: counts.get(k, 0) for k in ("passed", "failed", "skipped", "deselected")}
    result["failed"] += counts.get("error", 0) + counts.get("errors", 0)
    _write(out, result)
    return 0


def time_log(log: str, out: str, batch: int) -> int:
    """`resnet-imagenet time`'s closing averages (ms)."""
    text = Path(log).read_text(errors="replace")
    result = {}
    for key, label in (("forward_ms", "Forward pass"), ("backward_ms", "Backward pass"), ("fb_ms", "Forward-Backward")):
        m = re.search(rf"Average {label}: ([\d.]+) ms", text)
        if m is None:
            print(f"gpu_check: error: {log}: no 'Average {label}' line", file=sys.stderr)
            return 1
        result[key] = float(m.group(1))
    result["batch"] = batch
    _write(out, result)
    return 0


def prune(device: str, batch: int, reps: int, out: str) -> int:
    """bench_prune.bench_forward on ``device`` (d14prune's script, called as it is): its printed figures."""
    import torch
    from bench_prune import bench_forward

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench_forward(batch, reps, torch.device(device))
    text = buf.getvalue()
    print(text, end="")
    ms = [float(x) for x in re.findall(r"(?:unpruned|pruned)\s+([\d.]+) ms", text)]
    speedup = re.search(r"real speed-up ([\d.]+)x", text)
    macs = re.search(r"([\d.]+)x fewer MACs", text)
    if len(ms) != 2 or speedup is None:
        print("gpu_check: error: bench_prune.bench_forward printed no speed-up", file=sys.stderr)
        return 1
    result = {"unpruned_ms": ms[0], "pruned_ms": ms[1], "speedup": float(speedup.group(1)), "batch": batch}
    result["mac_ratio"] = float(macs.group(1)) if macs else None
    _write(out, result)
    return 0


def _rows(r: dict) -> list[str]:
    """The BENCHMARKS.md rows of the steps that gave figures."""
    s, dev = r["steps"], r["env"].get("device", "?")
    rows = [f"GPU check on {dev} ({r['env'].get('gpus', 0)} GPU(s), torch {r['env'].get('torch')}, "
            f"CUDA {r['env'].get('cuda')}, {r['env'].get('date')}), benchmarks/gpu_check.sh:", "",
            "| figure | setting | value |", "|---|---|---|"]  # fmt: skip
    t = s.get("tests", {})
    if "passed" in t:
        rows.append(f"| GPU-marked tests (`pytest -m gpu`) | | {t['passed']} passed, {t['failed']} failed, "
                    f"{t['skipped']} skipped |")  # fmt: skip
    for key, name in (("train_amp", "AMP"), ("train_fp32", "fp32 (--no-amp --no-channels-last)")):
        x = s.get(key, {})
        if "img_s" in x:
            rows.append(f"| `train.sh {r['gpus']} {r['net']}` {name} | {x['precision']}, batch {x['batch']}, "
                        f"{r['iterations']} iterations, {r['workers']} workers, synthetic "
                        f"{r['lmdb'].get('n')}-JPEG LMDB | "
                        f"**{x['img_s']:,.0f} img/s**, data wait {x['data_wait_pct']:.1f}% |")  # fmt: skip
    a, f = s.get("train_amp", {}), s.get("train_fp32", {})
    if "img_s" in a and "img_s" in f:
        rows.append(f"| AMP / fp32 | | **{a['img_s'] / f['img_s']:.2f}x** |")
    x = s.get("time", {})
    if "fb_ms" in x:
        gpu = "cpu" if r["dry_run"] else 0
        rows.append(f"| `time --gpu {gpu}` {r['net']} (fp32) | batch {x['batch']} | forward {x['forward_ms']:.1f} ms, "
                    f"backward {x['backward_ms']:.1f} ms, forward-backward {x['fb_ms']:.1f} ms |")  # fmt: skip
    for key in ("fb_amp", "fb_fp32"):
        x = s.get(key, {})
        if "ratio" in x:
            fb = f"bench_forward_backward {x['net']} / torchvision {x['peer']}"
            rows.append(f"| {fb} | {x['setting']} | {x['img_s']['ours']:,.0f} vs "
                        f"{x['img_s']['torchvision']:,.0f} img/s: **{x['ratio']:.3f}** |")  # fmt: skip
    x = s.get("prune", {})
    if "speedup" in x:
        rows.append(f"| ResNet-50 pruned 2x, forward (bench_prune.bench_forward) | batch {x['batch']}, fp32 | "
                    f"{x['unpruned_ms']:.1f} -> {x['pruned_ms']:.1f} ms: **{x['speedup']:.2f}x** "
                    f"({x['mac_ratio']}x fewer MACs) |")  # fmt: skip
    failed = [k for k, v in s.items() if v.get("rc", 0) != 0]
    if failed:
        rows += ["", "Steps that failed or timed out: " + ", ".join(f"{k} (rc {s[k]['rc']})" for k in failed)]
    return rows


def report(folder: str, out: str) -> int:
    """Merge the steps' JSON files of ``folder`` into ``out``; print the BENCHMARKS.md rows."""
    d = Path(folder)
    steps = {}
    for p in sorted(d.glob("step_*.json")):
        steps[p.stem[5:]] = json.loads(p.read_text())
    rcs = json.loads((d / "rcs.json").read_text()) if (d / "rcs.json").is_file() else {}
    for k, (rc, seconds) in rcs.items():
        steps.setdefault(k, {}).update(rc=rc, seconds=seconds)
    meta = json.loads((d / "meta.json").read_text())
    r = {"env": json.loads((d / "env.json").read_text()), **meta, "steps": steps}
    r["rows"] = _rows(r)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(r, indent=1) + "\n")
    print("\n".join(r["rows"]))
    print(f"\ngpu_check: wrote {out}")
    return int(any(v.get("rc", 0) != 0 for v in steps.values()))


def main(argv: list[str]) -> int:
    cmd, *a = argv
    if cmd == "env":
        return env(a[0], cpu_ok="--cpu-ok" in a)
    if cmd == "lmdb":
        return make_lmdb(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]) if len(a) > 4 else 0)
    if cmd == "prepare":
        return prepare(a[0], a[1], a[2], int(a[3]))
    if cmd == "train-log":
        return train_log(a[0], a[1])
    if cmd == "pytest-log":
        return pytest_log(a[0], a[1])
    if cmd == "time-log":
        return time_log(a[0], a[1], int(a[2]))
    if cmd == "prune":
        return prune(a[0], int(a[1]), int(a[2]), a[3])
    if cmd == "report":
        return report(a[0], a[1])
    raise SystemExit(f"_gpu_check.py: unknown step {cmd!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
