"""Tiny real image files and LMDBs for the data tests (made with OpenCV in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from resnet_imagenet.data.convert import ConvertOptions, convert_imageset


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A BGR uint8 image smooth enough to survive JPEG, random enough to tell crops apart."""
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    return cv2.GaussianBlur(img, (5, 5), 0)


def write_images(root: Path, images: list[np.ndarray], ext: str = ".png") -> list[str]:
    """Write images as root/img<i><ext>; return the relative names."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f"img{i:03d}{ext}"
        assert cv2.imwrite(str(root / name), img)
        names.append(name)
    return names


def make_db(
    tmp: Path, images: list[np.ndarray], labels: list[int] | None = None, *, encoded: bool = False,
    name: str = "db", ext: str = ".png", **opts,
) -> Path:  # fmt: skip
    """An LMDB of ``images`` (labels default to the image index) built by convert_imageset."""
    labels = list(range(len(images))) if labels is None else labels
    root = tmp / f"{name}_images"
    names = write_images(root, images, ext)
    listfile = tmp / f"{name}.txt"
    listfile.write_text("".join(f"{n} {lab}\n" for n, lab in zip(names, labels)))
    db = tmp / name
    convert_imageset(root, listfile, db, ConvertOptions(encoded=encoded, **opts), jobs=1, progress=False)
    return db
