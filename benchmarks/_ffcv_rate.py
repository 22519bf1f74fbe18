"""FFCV's img/s, run by bench_loader.py with the FFCV venv's python (FFCV cannot live in the main venv).

Usage: python _ffcv_rate.py FILES_DIR BETON BATCH WORKERS BATCHES -- prints img/s last.
Writes BETON once from the ImageFolder FILES_DIR (the same 256-px JPEGs the other loaders read): FFCV
re-encodes them (jpeg_quality 95, as our convert), so its bytes are not ours. FFCV has no plain random
crop decoder: RandomResizedCropRGBImageDecoder((224, 224)) (a resize per image: more work than ours),
then mirror, mean (float32, on the CPU), tensor, CHW; os_cache=True, QUASI_RANDOM order, ``WORKERS`` threads.
Not run on the development machine (no FFCV there): check its first figure by hand.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter
from torchvision import datasets


def main() -> None:
    files, beton, batch, workers, n_batches = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:6])
    if not beton.is_file():
        ds = datasets.ImageFolder(files)
        fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=95), "label": IntField()}
        DatasetWriter(str(beton), fields, num_workers=workers).from_indexed_dataset(ds)
    mean = np.array([123.0, 117.0, 104.0])  # our BGR mean_value, in FFCV's RGB order
    pipelines = {
        "image": [
            RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip(),
            NormalizeImage(mean, np.ones(3), np.float32), ToTensor(), ToTorchImage(),
        ],
        "label": [IntDecoder(), ToTensor(), Squeeze()],
    }  # fmt: skip
    loader = Loader(
        str(beton), batch_size=batch, num_workers=workers, order=OrderOption.QUASI_RANDOM, os_cache=True,
        drop_last=True, pipelines=pipelines,
    )  # fmt: skip
    torch.set_num_threads(1)
    done, t = 0, None
    while done < n_batches:
        for _ in loader:
            if t is None:
                t = time.perf_counter()  # after the first batch: compilation and start-up
                continue
            done += 1
            if done == n_batches:
                break
    print(f"{n_batches * batch / (time.perf_counter() - t):.1f}")


if __name__ == "__main__":
    main()
