"""Figure: loader throughput -- DataFeed on LMDBs vs torchvision ImageFolder + PIL on the original JPEGs.

Same synthetic ImageNet-sized JPEGs; TRAIN crop 224 + mirror + mean, batch 128, 2 workers, on CPU.
DataFeed reads (a) an encoded --min_dim 256 LMDB and (b) a raw 256x256 LMDB; the baseline is
ImageFolder with Resize(256), RandomCrop(224), RandomHorizontalFlip, ToTensor, Normalize. Prints
img/s, img/s per worker core, LMDB bytes per image, and the ratios against the baseline.
Usage: python benchmarks/bench_loader.py [--n 2000] [--batches 30] [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _synth import make_jpegs  # noqa: E402

from resnet_imagenet.data.convert import ConvertOptions, convert_imageset  # noqa: E402
from resnet_imagenet.data.feed import DataFeed  # noqa: E402
from resnet_imagenet.proto import caffe_pb2  # noqa: E402
from resnet_imagenet.proto.text import parse_text  # noqa: E402


def rate(batches, n_batches: int, batch: int) -> float:
    it = iter(batches)
    next(it)  # warm-up: worker start
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - t)


def feed_rate(db: Path, batch: int, workers: int, n_batches: int) -> float:
    lp = parse_text(
        f'name: "data" type: "Data" top: "data" top: "label" transform_param {{ crop_size: 224 mirror: true '
        f'mean_value: 104 mean_value: 117 mean_value: 123 }} data_param {{ source: "{db}" batch_size: {batch} '
        f"backend: LMDB }}",
        caffe_pb2.LayerParameter(),
    )
    feed = DataFeed(lp, "train", num_workers=workers)

    def gen():
        while True:
            yield feed.next()

    try:
        return rate(gen(), n_batches, batch)
    finally:
        feed.close()


def torchvision_rate(src: Path, batch: int, workers: int, n_batches: int) -> float:
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize(256), transforms.RandomCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    ds = datasets.ImageFolder(str(src), tf)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers)
    return rate(dl, n_batches, batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per loader")
    ap.add_argument("--quick", action="store_true", help="40 images, batch 8, 3 batches: check that it runs")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "resnet_imagenet_bench")
    args = ap.parse_args()
    n, batch, nb = (40, 8, 3) if args.quick else (args.n, args.batch, args.batches)
    src = make_jpegs(args.workdir / f"jpegs_{n}", n)
    dbs = {
        "encoded min_dim 256": ConvertOptions(min_dim=256, encoded=True),
        "raw 256x256": ConvertOptions(resize_height=256, resize_width=256),
    }
    sizes = {}
    for name, opts in dbs.items():
        db = args.workdir / f"loader_{name.split()[0]}_{n}"
        shutil.rmtree(db, ignore_errors=True)
        s = convert_imageset(src, None, db, opts, progress=False)
        sizes[name] = (db, s.bytes / s.written)
    print(f"{n} JPEGs, batch {batch}, {args.workers} workers, crop 224 + mirror + mean, TRAIN")
    base = torchvision_rate(src, batch, args.workers, nb)
    print(f"baseline torchvision ImageFolder + PIL: {base:.0f} img/s ({base / args.workers:.0f} img/s per worker)")
    for name, (db, per) in sizes.items():
        r = feed_rate(db, batch, args.workers, nb)
        print(f"DataFeed, {name} LMDB ({per / 1e3:.1f} kB/image): {r:.0f} img/s "
              f"({r / args.workers:.0f} img/s per worker); ratio {r / base:.2f}x")  # fmt: skip
        shutil.rmtree(db, ignore_errors=True)


if __name__ == "__main__":
    main()
