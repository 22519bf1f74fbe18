"""Cost of convert_imageset's strict image check (issue 13 cases 3 and 5) per 256-px image, one core.

Interleaved rounds, median per image, over JPEGs of smooth random content at quality 90:
  cv2.imdecode               OpenCV alone (what Caffe's convert_imageset does; no warnings seen)
  simplejpeg strict          libjpeg-turbo stopping on any warning (the decode before this change)
  decode_image strict        ours now: header pixel limit + strict decode + the progressive scan check
  header check only          data/imagesize.py check_pixels + progressive_complete
for baseline and progressive files. Run alone on an idle machine: python benchmarks/bench_decode_check.py
"""

from __future__ import annotations

import statistics
import time

import cv2
import numpy as np
import simplejpeg

from resnet_imagenet.data import transform as T
from resnet_imagenet.data.imagesize import check_pixels, progressive_complete


def images(n: int, progressive: bool) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = cv2.GaussianBlur((rng.random((256, 341, 3)) * 255).astype(np.uint8), (3, 3), 0)
        flags = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
        out.append(cv2.imencode(".jpg", img, flags)[1].tobytes())
    return out


def main(n: int = 64, rounds: int = 7) -> None:
    variants = {
        "cv2.imdecode": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
        "simplejpeg strict": lambda b: simplejpeg.decode_jpeg(b, colorspace="BGR", strict=True),
        "decode_image strict": lambda b: T.decode_image(b, strict=True),
        "header check only": lambda b: (check_pixels(b), progressive_complete(b)),
    }
    for progressive in (False, True):
        bufs = images(n, progressive)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                t = time.perf_counter()
                for b in bufs:
                    fn(b)
                times[name].append((time.perf_counter() - t) / n)
        kind = "progressive" if progressive else "baseline"
        kb = sum(map(len, bufs)) / n / 1e3
        for name, ts in times.items():
            print(f"{kind:12s} {kb:5.1f} kB  {name:22s} {statistics.median(ts) * 1e6:8.1f} us/image")


if __name__ == "__main__":
    cv2.setNumThreads(1)
    main()
