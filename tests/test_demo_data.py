"""The built-in demo dataset: layout, list files, real decodable JPEGs, determinism, no partial output."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from resnet_imagenet import cli
from resnet_imagenet.tools.demo_data import CLASSES, _shape_mask, write_demo_dataset


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_lists_and_jpegs(tmp_path) -> None:
    root = tmp_path / "demo"
    m = write_demo_dataset(root, train_per_class=3, val_per_class=2, seed=5)
    assert m["classes"] == list(CLASSES) == sorted(CLASSES) and len(CLASSES) == 10
    assert sorted(p.name for p in root.iterdir()) == ["labels.txt", "manifest.json", "train", "train.txt", "val",
                                                      "val.txt"]  # fmt: skip
    assert (root / "labels.txt").read_text().split() == list(CLASSES)
    train = (root / "train.txt").read_text().splitlines()
    assert len(train) == 3 * 10 and train[0] == "checkerboard/checkerboard_0000.jpg 0"
    assert train[-1] == "triangle/triangle_0002.jpg 9"
    for line in train + (root / "val.txt").read_text().splitlines():
        rel, label = line.split()
        split = "train" if line in train else "val"
        path = root / split / rel
        assert path.parent.name == CLASSES[int(label)]  # SubFolderName == ClassName
        data = path.read_bytes()
        assert data[:3] == b"\xff\xd8\xff"  # a real JPEG file
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert img.ndim == 3 and 64 <= img.shape[0] <= 96 and 64 <= img.shape[1] <= 96
    assert len(list((root / "val").rglob("*.jpg"))) == 2 * 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_deterministic_and_seed_dependent(tmp_path) -> None:
    a = write_demo_dataset(tmp_path / "a", train_per_class=2, val_per_class=1, seed=1) and _tree(tmp_path / "a")
    b = write_demo_dataset(tmp_path / "b", train_per_class=2, val_per_class=1, seed=1) and _tree(tmp_path / "b")
    c = write_demo_dataset(tmp_path / "c", train_per_class=2, val_per_class=1, seed=2) and _tree(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a["train/disc/disc_0000.jpg"] != c["train/disc/disc_0000.jpg"]
    # An image depends only on (seed, split, class, index), not on how many images are made.
    d = write_demo_dataset(tmp_path / "d", train_per_class=1, val_per_class=1, seed=1) and _tree(tmp_path / "d")
    assert d["train/ring/ring_0000.jpg"] == a["train/ring/ring_0000.jpg"]


def test_shapes_whole_and_centred() -> None:
    # Every shape lies inside the image (a crop near the centre sees it); ring, frame: hollow centroid.
    for name in ("cross", "disc", "frame", "ring", "square", "triangle"):
        for i in range(10):
            m = _shape_mask(name, np.random.default_rng([3, i]), 80, 90)
            assert m.shape == (80, 90) and m.max() == 1.0
            assert m[0].max() == m[-1].max() == m[:, 0].max() == m[:, -1].max() == 0.0
            ys, xs = np.nonzero(m > 0.5)
            cy, cx = round(float(ys.mean())), round(float(xs.mean()))
            assert abs(cy - 40) <= 12 and abs(cx - 45) <= 13
            assert m[cy, cx] == (0.0 if name in ("ring", "frame") else 1.0), (name, i)


def test_refuses_to_overwrite(tmp_path, capsys) -> None:
    root = tmp_path / "demo"
    root.mkdir()
    (root / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_demo_dataset(root, train_per_class=1, val_per_class=1)
    assert cli.main(["demo_data", str(root), "--train-per-class", "1", "--val-per-class", "1"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (root / "mine.txt").read_text() == "keep me"
    # --overwrite replaces only an earlier demo dataset, never a folder of the user's (issue 13)
    assert cli.main(["demo_data", str(root), "--train-per-class", "1", "--val-per-class", "1", "--overwrite"]) == 1
    assert "'mine.txt', which is no part of a demo dataset" in capsys.readouterr().err
    assert (root / "mine.txt").read_text() == "keep me"
    (root / "mine.txt").unlink()
    write_demo_dataset(root, train_per_class=1, val_per_class=1)
    assert cli.main(["demo_data", str(root), "--train-per-class", "2", "--val-per-class", "1", "--overwrite"]) == 0
    assert len(list(root.rglob("*.jpg"))) == 30
