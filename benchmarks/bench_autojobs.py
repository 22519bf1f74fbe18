"""Figure: convert_imageset without --jobs (measured choice) vs --jobs 1 and --jobs <all cores>.

Two inputs: synthetic ImageNet-sized JPEGs (decode-bound: the pool should win) and the same images
pre-resized to 256 px and stored encoded (a copy per image, round-trip-bound: one process should win,
issue 15's 1.8x). Prints img/s of each and the job count the measurement chose.
Usage: python benchmarks/bench_autojobs.py [--n 2000] [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
from _synth import make_jpegs  # noqa: E402

from resnet_imagenet.data.convert import ConvertOptions, convert_imageset  # noqa: E402
from resnet_imagenet.data.pool import default_jobs  # noqa: E402


class _Choice(logging.Handler):
    def __init__(self):
        super().__init__()
        self.line = "(decided before the trial ended)"

    def emit(self, record: logging.LogRecord) -> None:
        self.line = record.getMessage()


def rate(src: Path, db: Path, opts: ConvertOptions, jobs: int | None) -> float:
    shutil.rmtree(db, ignore_errors=True)
    s = convert_imageset(src, None, db, opts, jobs=jobs, progress=False)
    return s.written / s.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images (default 2000)")
    ap.add_argument("--quick", action="store_true", help="40 images: check that the script runs")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "resnet_imagenet_bench")
    args = ap.parse_args()
    n, cores = (40 if args.quick else args.n), default_jobs()
    big = make_jpegs(args.workdir / f"jpegs_{n}", n)
    small = args.workdir / f"jpegs256_{n}"
    if not small.is_dir():  # the same images at 256 px, as files: convert then writes each file as is
        for f in big.rglob("*.JPEG"):
            img = cv2.imread(str(f))
            s = 256 / min(img.shape[:2])
            (small / f.parent.name).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(small / f.parent.name / f.name), cv2.resize(img, None, fx=s, fy=s))
    choice = _Choice()
    logging.getLogger("resnet_imagenet.data.autojobs").addHandler(choice)
    logging.getLogger("resnet_imagenet.data.autojobs").setLevel(logging.INFO)
    for label, src, opts in (
        ("originals, --min_dim 256 --encoded", big, ConvertOptions(min_dim=256, encoded=True)),
        ("pre-resized 256 px, --encoded", small, ConvertOptions(encoded=True)),
    ):
        one = rate(src, args.workdir / "db_auto", opts, 1)
        allc = rate(src, args.workdir / "db_auto", opts, cores)
        choice.line = "(decided before the trial ended)"
        auto = rate(src, args.workdir / "db_auto", opts, None)
        print(f"{label}: --jobs 1 {one:.0f} img/s, --jobs {cores} {allc:.0f}, no --jobs {auto:.0f}; {choice.line}")
    shutil.rmtree(args.workdir / "db_auto", ignore_errors=True)


if __name__ == "__main__":
    main()
