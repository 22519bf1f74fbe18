"""Figure: loader throughput -- DataFeed on LMDBs vs torchvision ImageFolder + PIL, NVIDIA DALI and FFCV.

Synthetic ImageNet-sized JPEGs; an encoded --min_dim 256 LMDB of them; the SAME 256-px JPEG bytes written
out as an ImageFolder (for torchvision and FFCV; DALI reads the LMDB with fn.readers.caffe). TRAIN crop
224 + mirror + mean, batch 128, 2 workers (DALI: 2 threads), on CPU. Every loader is measured once per
round, rounds interleaved (the machine's load drifts); medians; each figure is also given as a ratio
against the baseline of the same run: torchvision ImageFolder + PIL on the same 256-px files.
DataFeed is measured three ways: float batches (the mean subtracted on the CPU, in the main process:
what a CPU-only run costs), uint8 batches (the float work left to the device, as on a GPU: the host's
whole cost), and uint8 with the opt-in decode='fast' (data/decode_fast.py); "before": the mirror as
the reversed view the feed used before T.mirror; and float batches from a raw 256x256 LMDB. "decode ceiling": the JPEG
decodes alone, one process per worker. Peers that are absent are skipped with the reason.
Usage: python benchmarks/bench_loader.py [--n 2000] [--batches 30] [--rounds 5] [--quick] [--workdir DIR]
       [--ffcv-python /work/ffcv-venv/bin/python] [--only NAME,NAME]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import simplejpeg  # noqa: E402
from _peers import Skip, dali_loader, ffcv_rate, torchvision_loader  # noqa: E402
from _synth import make_jpegs  # noqa: E402

from resnet_imagenet.data import transform as T  # noqa: E402
from resnet_imagenet.data.convert import ConvertOptions, convert_imageset  # noqa: E402
from resnet_imagenet.data.datum import parse_datum  # noqa: E402
from resnet_imagenet.data.feed import DataFeed  # noqa: E402
from resnet_imagenet.data.records import Records  # noqa: E402
from resnet_imagenet.proto import caffe_pb2  # noqa: E402
from resnet_imagenet.proto.text import parse_text  # noqa: E402

BASELINE = "torchvision ImageFolder + PIL, 256-px files"
FAST_MIRROR = T.mirror


def rate(start, n_batches: int, batch: int) -> float:
    it = start()
    next(it)  # warm-up: worker start
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - t)


def feed_loader(db: Path, batch: int, workers: int, *, host_only: bool = False, decode: str = "exact", view=False):
    lp = parse_text(
        f'name: "data" type: "Data" top: "data" top: "label" transform_param {{ crop_size: 224 mirror: true '
        f'mean_value: 104 mean_value: 117 mean_value: 123 }} data_param {{ source: "{db}" batch_size: {batch} '
        f"backend: LMDB }}",
        caffe_pb2.LayerParameter(),
    )

    def start():
        # view: the mirror as a reversed view, as before T.mirror (the workers fork with the patched module)
        T.mirror = (lambda img: img[:, ::-1]) if view else FAST_MIRROR
        with DataFeed(lp, "train", num_workers=workers, decode=decode) as feed:
            if host_only:  # the uint8 batch as the device receives it: leave its float work to the device
                feed._transform = lambda x, geo: x
            while True:
                yield feed.next()

    return start


def _decode_all(bufs: list[bytes]) -> int:
    for b in bufs:
        simplejpeg.decode_jpeg(b, colorspace="BGR")
    return len(bufs)


def ceiling_rate(bufs: list[bytes], workers: int, n: int) -> float:
    """img/s of the decodes alone: ``workers`` processes each decoding its share of ``n`` images."""
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_all, [bufs[:4]] * workers)  # start-up
        t = time.perf_counter()
        done = sum(pool.map(_decode_all, [(bufs * (n // len(bufs) + 1))[: n // workers]] * workers))
        return done / (time.perf_counter() - t)


def export_files(db: Path, out: Path) -> list[bytes]:
    """The LMDB's JPEG bytes as out/<label>/<i>.JPEG (the same bytes, for the file-based loaders)."""
    recs, bufs = Records(db, is_list=False), []
    for i in range(recs.n):
        d = parse_datum(recs.raw(i))
        (out / f"{d.label:04d}").mkdir(parents=True, exist_ok=True)
        (out / f"{d.label:04d}" / f"{i:06d}.JPEG").write_bytes(d.data)
        bufs.append(d.data)
    recs.close()
    return bufs


def prepare(args, n: int) -> tuple[Path, tuple[Path, Path], Path, list[bytes]]:
    src = make_jpegs(args.workdir / f"jpegs_{n}", n)
    db, raw = args.workdir / f"loader_encoded_{n}", args.workdir / f"loader_raw_{n}"
    files = args.workdir / f"files256_{n}"
    for path in (db, raw, files):
        shutil.rmtree(path, ignore_errors=True)
    s = convert_imageset(src, None, db, ConvertOptions(min_dim=256, encoded=True), progress=False)
    print(f"{n} JPEGs -> encoded min_dim 256 LMDB, {s.bytes / s.written / 1e3:.1f} kB/image")
    s = convert_imageset(src, None, raw, ConvertOptions(resize_height=256, resize_width=256), progress=False)
    print(f"{n} JPEGs -> raw 256x256 LMDB, {s.bytes / s.written / 1e3:.1f} kB/image")
    return src, (db, raw), files, export_files(db, files)


def loaders(args, src: Path, dbs: tuple[Path, Path], files: Path, bufs: list[bytes], batch: int, nb: int) -> dict:
    """name -> a function of no arguments returning one img/s figure (a fresh loader each time)."""
    w, (db, raw), n = args.workers, dbs, len(bufs)
    beton = args.workdir / f"ffcv_{n}.beton"
    out = {
        BASELINE: lambda: rate(torchvision_loader(files, batch, w), nb, batch),
        "torchvision ImageFolder + PIL, original files": lambda: rate(torchvision_loader(src, batch, w), nb, batch),
        "DataFeed, float batches (mean on the CPU)": lambda: rate(feed_loader(db, batch, w), nb, batch),
        "DataFeed, uint8 batches (float work on the device)": lambda: rate(
            feed_loader(db, batch, w, host_only=True), nb, batch
        ),
        "DataFeed, uint8 batches, mirror as a reversed view (before)": lambda: rate(
            feed_loader(db, batch, w, host_only=True, view=True), nb, batch
        ),
        "DataFeed, float batches, raw 256x256 LMDB": lambda: rate(feed_loader(raw, batch, w), nb, batch),
        "DataFeed, uint8 batches, decode='fast'": lambda: rate(
            feed_loader(db, batch, w, host_only=True, decode="fast"), nb, batch
        ),
        "DALI CPU, fn.readers.caffe on the LMDB": lambda: rate(dali_loader(db, batch, w, roi=False), nb, batch),
        "DALI CPU, fn.readers.caffe, ROI decode": lambda: rate(dali_loader(db, batch, w, roi=True), nb, batch),
        "FFCV on a .beton of the 256-px files": lambda: ffcv_rate(args.ffcv_python, files, beton, batch, w, nb),
        "decode ceiling (JPEG decodes alone)": lambda: ceiling_rate(bufs, w, nb * batch),
    }
    if args.only:
        keep = [k for k in out if k == BASELINE or any(s.strip() in k for s in args.only.split(","))]
        out = {k: out[k] for k in keep}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per loader and round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are reported)")
    ap.add_argument("--quick", action="store_true", help="40 images, batch 8, 3 batches, 1 round: check that it runs")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "resnet_imagenet_bench")
    ap.add_argument("--ffcv-python", default="/work/ffcv-venv/bin/python", help="an interpreter with ffcv")
    ap.add_argument("--only", default="", help="comma-separated name parts: measure only these (and the baseline)")
    args = ap.parse_args()
    n, batch, nb, rounds = (40, 8, 3, 1) if args.quick else (args.n, args.batch, args.batches, args.rounds)
    src, dbs, files, bufs = prepare(args, n)
    todo = loaders(args, src, dbs, files, bufs, batch, nb)
    print(f"batch {batch}, {args.workers} workers, crop 224 + mirror + mean, TRAIN, {rounds} rounds x {nb} batches")
    figures: dict[str, list[float]] = {k: [] for k in todo}
    skipped: dict[str, str] = {}
    for r in range(rounds):
        for name, measure in todo.items():
            if name in skipped:
                continue
            try:
                figures[name].append(measure())
            except Skip as e:
                skipped[name] = str(e)
        print(f"round {r + 1}: " + ", ".join(f"{v[-1]:.0f}" for k, v in figures.items() if k not in skipped))
    print(f"\nmedians of {rounds} rounds; ratio = loader / baseline ({BASELINE}) of the same run")
    for name, v in figures.items():
        if name in skipped:
            print(f"{name:60s} skipped: {skipped[name]}")
        else:
            ratios = [a / b for a, b in zip(v, figures[BASELINE])]  # per round, then the median
            m = statistics.median(v)
            print(f"{name:60s} {m:7.0f} img/s  {m / args.workers:6.0f}/worker  {statistics.median(ratios):5.2f}x")
    for db in dbs:
        shutil.rmtree(db, ignore_errors=True)


if __name__ == "__main__":
    main()
