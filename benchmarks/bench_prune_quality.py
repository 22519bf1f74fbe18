"""Figure: channel pruning quality on the demo's trained tiny ResNet -- LASSO + least squares vs l1.

Prunes the demo's `resnet_tiny` (trained by `make demo`, in demo_out/) 2x by multiply-adds with both
`--method lasso` and `--method l1` at the same kept widths, then tests each before and after the
same short fine-tune (`./train.sh cpu ...` with the exported solver), and prints top-1 on the 500 val
images against the unpruned net's. Runs the demo first when demo_out/ is missing.
Usage: python benchmarks/bench_prune_quality.py [--demo-out demo_out] [--quick]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "resnet_imagenet"]


def run(argv: list[str], cwd: Path) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout


def top1(cwd: Path, model: str, weights: str) -> float:
    out = run(CLI + ["test", "--model", model, "--weights", weights], cwd)
    return float(re.search(r"^accuracy@1 = ([0-9.e+-]+)$", out, re.M).group(1))  # the zoo nets' top-1 output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-out", type=Path, default=REPO / "demo_out")
    ap.add_argument("--quick", action="store_true", help="accepted for run_all.sh; the figure needs the full demo")
    args, _ = ap.parse_known_args()
    out = args.demo_out.resolve()
    if not (out / "snapshots" / "resnet_tiny_iter_1000.caffemodel").is_file():
        subprocess.run(CLI + ["demo", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    base = "snapshots/resnet_tiny_iter_1000.caffemodel"
    print("resnet_tiny on the demo data (500 val images), pruned 2x by multiply-adds, same kept widths")
    print(f"  unpruned: top-1 {top1(out, 'prototxt_like/resnet_tiny/train_val.prototxt', base):.3f}")
    for method in ("lasso", "l1"):
        name = f"resnet_tiny_q{method}"
        folder = out / "prototxt_like" / name
        shutil.rmtree(folder, ignore_errors=True)
        for old in (out / "snapshots").glob(f"{name}_iter_*"):
            old.unlink()
        report = run(CLI + ["prune", "--model", "prototxt_like/resnet_tiny/train_val.prototxt", "--weights", base,
                            "--data", "data/tiny_train_lmdb", "--speedup", "2.0", "--method", method,
                            "--out", f"prototxt_like/{name}"], out)  # fmt: skip
        errors = [float(e) for e in re.findall(r"\d+ -> \d+\s+([0-9.]+)$", report, re.M)]
        model = f"prototxt_like/{name}/train_val.prototxt"
        before = top1(out, model, f"prototxt_like/{name}/{name}_pruned.caffemodel")
        run(["bash", str(REPO / "train.sh"), "cpu", name, f"{name}_", "--weights",
             f"prototxt_like/{name}/{name}_pruned.caffemodel"], out)  # fmt: skip
        snaps = sorted((out / "snapshots").glob(f"{name}_iter_*.caffemodel"), key=lambda p: int(p.stem.split("_")[-1]))
        after = top1(out, model, snaps[-1].relative_to(out).as_posix())
        mean_err = sum(errors) / len(errors) if errors else float("nan")
        print(f"  {method:5s}: mean relative reconstruction error {mean_err:.3f}; top-1 {before:.3f} pruned, "
              f"{after:.3f} after fine-tuning ({snaps[-1].stem.split('_')[-1]} iterations)")  # fmt: skip


if __name__ == "__main__":
    main()
