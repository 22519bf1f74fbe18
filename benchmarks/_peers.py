"""The loaders bench_loader.py measures DataFeed against: torchvision ImageFolder + PIL, NVIDIA DALI on the CPU
reading our LMDB (fn.readers.caffe), and FFCV (its own venv, through _ffcv_rate.py). Each factory returns a
zero-argument callable that starts the loader and yields batches, or raises Skip with the reason."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

MEAN_BGR = (104.0, 117.0, 123.0)  # the transform_param mean_value every loader subtracts
Batches = Callable[[], Iterator]


class Skip(Exception):
    """This loader cannot run here; the message says why and what it needs."""


def torchvision_loader(src: Path, batch: int, workers: int) -> Batches:
    """ImageFolder + PIL: Resize(256), RandomCrop(224), RandomHorizontalFlip, ToTensor, Normalize."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize(256), transforms.RandomCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    ds = datasets.ImageFolder(str(src), tf)

    def start() -> Iterator:
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)
        return iter(torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers))

    return start


def dali_loader(db: Path, batch: int, workers: int, *, roi: bool) -> Batches:
    """DALI on the CPU (device_id=None): fn.readers.caffe on our LMDB, libjpeg-turbo decode (``roi``: decode
    only the 224 crop, fn.decoders.image_crop), crop + mirror + mean to float CHW, ``workers`` threads."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        raise Skip(f"DALI not installed ({e}): pip install nvidia-dali-cuda120") from None

    @pipeline_def(batch_size=batch, num_threads=workers, device_id=None, seed=0)
    def pipe():
        jpegs, labels = fn.readers.caffe(path=str(db), random_shuffle=True, name="lmdb")
        pos = {"crop_pos_x": fn.random.uniform(range=(0.0, 1.0)), "crop_pos_y": fn.random.uniform(range=(0.0, 1.0))}
        cmn = {"dtype": types.FLOAT, "output_layout": "CHW", "mean": list(MEAN_BGR), "mirror": fn.random.coin_flip()}
        if roi:
            img = fn.decoders.image_crop(jpegs, device="cpu", output_type=types.BGR, crop=(224, 224), **pos)
            return fn.crop_mirror_normalize(img, **cmn), labels
        img = fn.decoders.image(jpegs, device="cpu", output_type=types.BGR)
        return fn.crop_mirror_normalize(img, crop=(224, 224), **pos, **cmn), labels

    def start() -> Iterator:
        p = pipe()
        p.build()
        while True:
            yield p.run()

    return start


FFCV_NEEDS = (
    "FFCV needs its own venv: apt-get install libturbojpeg0-dev libopencv-dev pkg-config; "
    "python -m venv /work/ffcv-venv; /work/ffcv-venv/bin/pip install ffcv numba opencv-python torch torchvision; "
    "then pass --ffcv-python /work/ffcv-venv/bin/python"
)


def ffcv_rate(python: str, files: Path, beton: Path, batch: int, workers: int, n_batches: int) -> float:
    """img/s of FFCV in its own interpreter (_ffcv_rate.py): one measurement, a fresh process each time."""
    if not python or not os.access(python, os.X_OK):
        raise Skip(f"no FFCV interpreter at {python or '(none)'}. {FFCV_NEEDS}")
    probe = subprocess.run([python, "-c", "import ffcv"], capture_output=True, text=True)
    if probe.returncode:
        raise Skip(f"{python} cannot import ffcv ({probe.stderr.strip().splitlines()[-1:]}). {FFCV_NEEDS}")
    script = Path(__file__).with_name("_ffcv_rate.py")
    args = [python, str(script), str(files), str(beton), str(batch), str(workers), str(n_batches)]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode:
        raise Skip(f"_ffcv_rate.py failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.split()[-1])
