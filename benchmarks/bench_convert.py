"""Figure: convert_imageset build rate, parallel (--jobs all cores) vs a single-process build (Caffe's tool).

Both build the recommended LMDB (--min_dim 256 --encoded) from the same synthetic ImageNet-sized
JPEGs; also the raw 256x256 build Caffe's tool is usually timed on. Prints img/s, img/s per core,
bytes per image, and the ratio parallel / single.
Usage: python benchmarks/bench_convert.py [--n 2000] [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synth import make_jpegs  # noqa: E402

from resnet_imagenet.data.convert import ConvertOptions, convert_imageset  # noqa: E402
from resnet_imagenet.data.pool import default_jobs  # noqa: E402


def build(src: Path, db: Path, opts: ConvertOptions, jobs: int) -> tuple[float, float]:
    shutil.rmtree(db, ignore_errors=True)
    s = convert_imageset(src, None, db, opts, jobs=jobs, progress=False)
    return s.written / s.seconds, s.bytes / s.written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images (default 2000)")
    ap.add_argument("--quick", action="store_true", help="40 images: check that the script runs")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "resnet_imagenet_bench")
    args = ap.parse_args()
    n = 40 if args.quick else args.n
    src = make_jpegs(args.workdir / f"jpegs_{n}", n)
    jobs = default_jobs()
    print(f"{n} JPEGs (shorter side 300-500 px), {jobs} cores")
    for label, opts in (
        ("encoded --min_dim 256", ConvertOptions(min_dim=256, encoded=True)),
        ("raw 256x256", ConvertOptions(resize_height=256, resize_width=256)),
    ):
        single, per = build(src, args.workdir / "db_single", opts, 1)
        par, _ = build(src, args.workdir / "db_par", opts, jobs)
        print(f"{label}: single process {single:.0f} img/s, --jobs {jobs} {par:.0f} img/s "
              f"({par / jobs:.0f} img/s per core), {per / 1e3:.1f} kB/image; ratio {par / single:.2f}x")  # fmt: skip
    for d in ("db_single", "db_par"):
        shutil.rmtree(args.workdir / d, ignore_errors=True)


if __name__ == "__main__":
    main()
