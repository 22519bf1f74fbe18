"""Realistic synthetic ImageNet-sized JPEGs for the data benchmarks (no downloads)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth shapes, gradients and fine texture: JPEG sizes close to ImageNet's (~100 kB at ~400x500)."""
    img = np.zeros((h, w, 3), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for c in range(3):
        img[:, :, c] = rng.uniform(40, 200) + rng.uniform(-60, 60) * (xx / w) + rng.uniform(-60, 60) * (yy / h)
    for _ in range(12):
        color = rng.uniform(0, 255, 3).tolist()
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(10, w // 3)), int(rng.integers(10, h // 3)))
        cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
    img = cv2.GaussianBlur(img, (0, 0), 3)
    img += rng.normal(0, 12, (h, w, 3)).astype(np.float32)  # sensor noise / texture
    return np.clip(img, 0, 255).astype(np.uint8)


def make_jpegs(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """root/<class>/<i>.JPEG, shorter side 300-500 px; reused when already there."""
    done = root / ".complete"
    if done.is_file() and int(done.read_text()) == n:
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        short = int(rng.integers(300, 501))
        long = int(short * rng.uniform(1.0, 1.5))
        h, w = (short, long) if rng.random() < 0.7 else (long, short)
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{i:06d}.JPEG"), photo_like(rng, h, w), [cv2.IMWRITE_JPEG_QUALITY, 90])
    done.write_text(str(n))
    return root
