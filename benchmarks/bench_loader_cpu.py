"""Figure: the loader's worker CPU time per image, lever by lever (time.process_time: robust to a shared machine).

One process makes DataFeed's uint8 batches as a worker does (the feed's dataset, num_workers=0) from an
encoded --min_dim 256 LMDB: TRAIN crop 224 + mirror, batches of 256, the variants interleaved per round,
medians. Variants: today's path (exact decode, T.mirror), the mirror as the reversed view it was before,
and the opt-in decode='fast'. 2 cores / (ms per image) bounds a 2-worker feed's img/s from above.
Usage: python benchmarks/bench_loader_cpu.py [--n 1000] [--rounds 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synth import make_jpegs  # noqa: E402

from resnet_imagenet.data import transform as T  # noqa: E402
from resnet_imagenet.data.convert import ConvertOptions, convert_imageset  # noqa: E402
from resnet_imagenet.data.feed import DataFeed  # noqa: E402
from resnet_imagenet.proto import caffe_pb2  # noqa: E402
from resnet_imagenet.proto.text import parse_text  # noqa: E402

FAST_MIRROR = T.mirror
VARIANTS = {  # name -> (mirror, decode)
    "exact decode, T.mirror (today)": (FAST_MIRROR, "exact"),
    "exact decode, mirror as a reversed view (before)": (lambda img: img[:, ::-1], "exact"),
    "decode='fast', T.mirror": (FAST_MIRROR, "fast"),
}


def cpu_ms_per_image(db: Path, mirror, decode: str, start: int, count: int) -> float:
    lp = parse_text(
        f'name: "data" type: "Data" top: "data" top: "label" transform_param {{ crop_size: 224 mirror: true }} '
        f'data_param {{ source: "{db}" batch_size: {count} backend: LMDB }}',
        caffe_pb2.LayerParameter(),
    )
    T.mirror = mirror
    try:
        with DataFeed(lp, "train", num_workers=0, decode=decode) as feed:
            feed._ds[(0, 8, True)]  # warm: the LMDB opened, the code paths loaded
            t = time.process_time()
            feed._ds[(start, count, True)]  # one uint8 batch exactly as a worker makes it
            return (time.process_time() - t) / count * 1e3
    finally:
        T.mirror = FAST_MIRROR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256, help="images per timed batch")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "resnet_imagenet_bench")
    args = ap.parse_args()
    src = make_jpegs(args.workdir / f"jpegs_{args.n}", args.n)
    db = args.workdir / f"loader_cpu_{args.n}"
    shutil.rmtree(db, ignore_errors=True)
    convert_imageset(src, None, db, ConvertOptions(min_dim=256, encoded=True), progress=False)
    ms: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for r in range(args.rounds):
        for name, (mirror, decode) in VARIANTS.items():
            ms[name].append(cpu_ms_per_image(db, mirror, decode, r * args.batch, args.batch))
    today = statistics.median(ms["exact decode, T.mirror (today)"])
    print(f"{args.n} images, encoded min_dim 256, TRAIN crop 224 + mirror; CPU ms per image, medians of {args.rounds}")
    for name, v in ms.items():
        m = statistics.median(v)
        print(f"{name:50s} {m:.3f} ms  (2 cores: <= {2000 / m:.0f} img/s)  {today / m:.2f}x today's speed")
    shutil.rmtree(db, ignore_errors=True)


if __name__ == "__main__":
    main()
