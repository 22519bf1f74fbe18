"""Figure: compute_image_mean on 1 vs 2 processes (--jobs), same bits; goal >= 1.7x on 2 cores.

Builds (once) the recommended LMDB (--min_dim 256 --encoded) of N synthetic ImageNet-sized JPEGs, then
times compute_image_mean --jobs 1 and --jobs 2 (warm page cache; best of --rounds) and checks that the
two means are byte-identical.
Usage: python benchmarks/bench_mean.py [--n 4000] [--rounds 3] [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synth import make_jpegs  # noqa: E402

from resnet_imagenet.data.convert import ConvertOptions, convert_imageset  # noqa: E402
from resnet_imagenet.data.mean import compute_image_mean  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="images (default 4000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="60 images, 1 round: check that the script runs")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "resnet_imagenet_bench")
    args = ap.parse_args()
    n, rounds = (60, 1) if args.quick else (args.n, args.rounds)
    db = args.workdir / f"mean_min256_{n}_lmdb"
    if not db.is_dir():
        src = make_jpegs(args.workdir / f"jpegs_{n}", n)
        convert_imageset(src, None, db, ConvertOptions(min_dim=256, encoded=True), progress=False)
    means, best = {}, {}
    for jobs in (1, 2):
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            means[jobs] = compute_image_mean(db, crop=224, progress=False, jobs=jobs)
            times.append(time.perf_counter() - t)
        best[jobs] = min(times)
        print(f"--jobs {jobs}: {best[jobs]:.2f} s  ({n / best[jobs]:.0f} img/s)")
    assert means[1].tobytes() == means[2].tobytes(), "the means differ"
    print(f"speed-up 2 vs 1: {best[1] / best[2]:.2f}x (goal >= 1.7x); means byte-identical")


if __name__ == "__main__":
    main()
