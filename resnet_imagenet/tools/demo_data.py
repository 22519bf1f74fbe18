"""A small built-in image dataset for the demo: JPEGs of shapes and textures in class folders, no download.

``write_demo_dataset(root)`` makes ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (SubFolderName ==
ClassName, as convert_imageset reads class folders), plus Caffe-style list files ``train.txt`` / ``val.txt``
(``relative/path label``) and ``labels.txt`` (one class name per line, in label order = sorted names).
Every image is a deterministic function of (seed, split, class, index): random image size, background gradient
and low-frequency noise with faint clutter, a shape (disc, square, frame, triangle, ring, cross) of random
colour, position, scale and rotation, or a texture (stripes, checkerboard, dots, grid) of random colours, period
and angle; then pixel noise, slight blur and JPEG compression. A tiny ResNet learns the 10 classes at crop 32
in minutes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np

from resnet_imagenet.tools import add_command
from resnet_imagenet.tools._flags import add_overwrite_flag
from resnet_imagenet.util.atomic import atomic_path, check_replaceable

log = logging.getLogger(__name__)

CLASSES = ("checkerboard", "cross", "disc", "dots", "frame", "grid", "ring", "square", "stripes", "triangle")  # sorted
_TEXTURES = ("checkerboard", "dots", "grid", "stripes")
_SPLITS = {"train": 0, "val": 1}
DEMO_NAMES = (*_SPLITS, *(f"{s}.txt" for s in _SPLITS), "labels.txt", "manifest.json")  # all that OUTDIR holds
_SS = 2  # supersampling of shape masks, for anti-aliased edges


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _luma(bgr: np.ndarray) -> float:
    return float(0.114 * bgr[0] + 0.587 * bgr[1] + 0.299 * bgr[2])


def _contrasting(rng: np.random.Generator, other: np.ndarray, min_diff: float = 70.0) -> np.ndarray:
    """A random colour whose brightness differs from ``other`` by at least ``min_diff``."""
    for _ in range(100):
        c = _colour(rng)
        if abs(_luma(c) - _luma(other)) >= min_diff:
            return c
    return np.full(3, 255.0 if _luma(other) < 128 else 0.0)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, amp: float) -> np.ndarray:
    """Low-frequency noise: a small random grid upsampled to (h, w)."""
    small = rng.normal(0, amp, size=(cells, cells, 3)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = _colour(rng), _colour(rng)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img = img + _smooth_noise(rng, h, w, int(rng.integers(3, 7)), 18.0)
    for _ in range(int(rng.integers(0, 4))):  # faint clutter: thin lines of a nearby colour
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        col = np.clip(img[p0[1], p0[0]] + rng.normal(0, 25, 3), 0, 255)
        cv2.line(img, p0, p1, tuple(float(v) for v in col), 1, cv2.LINE_AA)
    return img


def _polygon(cx: float, cy: float, r: float, n: int, rot: float) -> np.ndarray:
    a = rot + np.arange(n) * 2 * math.pi / n
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _shape_mask(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Anti-aliased float mask in [0, 1] of one shape with random position, scale and rotation."""
    H, W = h * _SS, w * _SS
    m = np.zeros((H, W), np.uint8)
    side = min(H, W)
    r = side * rng.uniform(0.24, 0.38)
    reach = r * {"triangle": 1.15, "cross": 1.05}.get(name, 1.0) + 2 * _SS  # the shape stays whole inside the image
    cx = W / 2 + rng.uniform(-1, 1) * max(0.0, min(0.12 * W, W / 2 - reach))
    cy = H / 2 + rng.uniform(-1, 1) * max(0.0, min(0.12 * H, H / 2 - reach))
    rot = rng.uniform(0, 2 * math.pi)
    if name == "disc":
        cv2.circle(m, (round(cx), round(cy)), round(r), 255, -1)
    elif name == "ring":
        cv2.circle(m, (round(cx), round(cy)), round(r), 255, -1)
        cv2.circle(m, (round(cx), round(cy)), round(r * rng.uniform(0.5, 0.62)), 0, -1)
    elif name in ("square", "triangle", "frame"):
        n = 3 if name == "triangle" else 4
        cv2.fillPoly(m, [np.round(_polygon(cx, cy, r * (1.15 if n == 3 else 1.0), n, rot)).astype(np.int32)], 255)
        if name == "frame":  # a square outline with a thick border
            inner = _polygon(cx, cy, r * rng.uniform(0.5, 0.62), n, rot)
            cv2.fillPoly(m, [np.round(inner).astype(np.int32)], 0)
    elif name == "cross":
        half_w = r * rng.uniform(0.22, 0.3)
        for a in (rot, rot + math.pi / 2):
            d = np.array([math.cos(a), math.sin(a)])
            n = np.array([-d[1], d[0]])
            c = np.array([cx, cy])
            pts = [c + d * r + n * half_w, c + d * r - n * half_w, c - d * r - n * half_w, c - d * r + n * half_w]
            cv2.fillPoly(m, [np.round(np.array(pts)).astype(np.int32)], 255)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _texture(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A whole-image texture of two contrasting colours with random period, phase and angle."""
    c0 = _colour(rng)
    c1 = _contrasting(rng, c0)
    period = min(h, w) * rng.uniform(0.16, 0.24)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 1)
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period + rng.uniform(0, 1)
    if name == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u)
        t = np.clip((t - 0.5) * 3 + 0.5, 0, 1)  # softened square wave
    elif name == "checkerboard":
        t = 0.5 + 0.5 * np.sign(np.sin(2 * math.pi * u) * np.sin(2 * math.pi * v))
    elif name == "grid":  # lines in two directions, about a quarter period wide
        t = np.clip((0.13 - np.minimum(np.abs(u - np.round(u)), np.abs(v - np.round(v)))) * period, 0, 1)
    elif name == "dots":
        du, dv = u - np.round(u), v - np.round(v)
        t = np.clip((0.3 - np.sqrt(du**2 + dv**2)) * period, 0, 1)
    else:
        raise ValueError(f"unknown texture {name!r}")
    return c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]


def make_image(class_name: str, rng: np.random.Generator, min_size: int = 64, max_size: int = 96) -> np.ndarray:
    """One demo image of ``class_name`` as an H x W x 3 BGR uint8 array (H, W random in [min_size, max_size])."""
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    if class_name in _TEXTURES:
        img = _texture(class_name, rng, h, w) + _smooth_noise(rng, h, w, 4, 12.0)
    else:
        bg = _background(rng, h, w)
        fg = _contrasting(rng, bg.mean(axis=(0, 1)))[None, None] + _smooth_noise(rng, h, w, 5, 15.0)
        m = _shape_mask(class_name, rng, h, w)[..., None]
        img = bg * (1 - m) + fg * m
    img = img + rng.normal(0, rng.uniform(2, 8), size=img.shape)
    sigma = rng.uniform(0, 1.0)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], label, index])


def _write_split(root: Path, split: str, per_class: int, seed: int, min_size: int, max_size: int) -> None:
    """``root/split/<class>/<class>_NNNN.jpg`` and the list file ``root/split.txt``."""
    lines = []
    for label, name in enumerate(CLASSES):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            img = make_image(name, _image_rng(seed, split, label, i), min_size, max_size)
            rel = f"{name}/{name}_{i:04d}.jpg"
            q = int(_image_rng(seed, split, label, i).integers(85, 96))
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for {rel}")
            (root / split / rel).write_bytes(buf.tobytes())
            lines.append(f"{rel} {label}\n")
    (root / f"{split}.txt").write_text("".join(lines))


def write_demo_dataset(
    root: str | os.PathLike,
    *,
    train_per_class: int = 100,
    val_per_class: int = 50,
    seed: int = 0,
    min_size: int = 64,
    max_size: int = 96,
    overwrite: bool = False,
) -> dict:
    """Write the demo dataset under ``root`` (made complete in a temporary folder, then renamed into place).

    Returns the manifest (also written as ``root/manifest.json``): classes, counts, seed and sizes.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not overwrite:
        raise FileExistsError(f"{root} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    check_replaceable(root, "demo dataset", DEMO_NAMES, required=["manifest.json"])
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    with atomic_path(root, is_dir=True) as tmp:
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            _write_split(tmp, split, per_class, seed, min_size, max_size)
        (tmp / "labels.txt").write_text("".join(f"{c}\n" for c in CLASSES))
        manifest = {
            "classes": list(CLASSES),
            "train_per_class": train_per_class,
            "val_per_class": val_per_class,
            "seed": seed,
            "min_size": min_size,
            "max_size": max_size,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    n = len(CLASSES)
    log.info("wrote %d train and %d val images of %d classes under %s", train_per_class * n, val_per_class * n, n, root)
    return manifest


# --- the command ---


def add_parser(sub: argparse._SubParsersAction) -> None:
    defaults = {k: v.default for k, v in inspect.signature(write_demo_dataset).parameters.items()}
    p = add_command(sub, "demo_data")
    p.add_argument("outdir", help="folder to create (OUTDIR/train/<class>/*.jpg, OUTDIR/val/..., list files)")
    for flag in ("train_per_class", "val_per_class", "seed"):
        p.add_argument(
            f"--{flag.replace('_', '-')}", type=int, default=defaults[flag], help=f"default {defaults[flag]}"
        )
    add_overwrite_flag(p, "OUTDIR if it is an earlier demo dataset (holding only what demo_data writes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    m = write_demo_dataset(
        args.outdir,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"{args.outdir}: {len(m['classes'])} classes, {m['train_per_class']} train + {m['val_per_class']} val each")
    return 0
