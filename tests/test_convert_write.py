"""What a build may replace and what it leaves: two runs into one target, --overwrite of inputs and user folders,
a killed build's temporaries, crafted and truncated ILSVRC tars, the class list taken from another DB (issue 13)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from _images import smooth_image, write_images

from resnet_imagenet.cli import main
from resnet_imagenet.data.convert import META_NAME, ConvertOptions, build_db, convert_imageset
from resnet_imagenet.data.datum import parse_datum
from resnet_imagenet.data.db import read_classes, read_meta
from resnet_imagenet.data.imagenet import convert_imagenet

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def records(db: Path) -> list[tuple[str, int]]:
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        out = [(k.decode(), parse_datum(v).label) for k, v in txn.cursor()]
    env.close()
    return out


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnet_imagenet", *argv], env=ENV, capture_output=True, text=True)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if "error" in ln or "Traceback" in ln]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}.tmp-")]


@pytest.fixture
def classes_root(tmp_path) -> Path:
    """ROOT/<class>/ with three classes of two small JPEGs each."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        write_images(tmp_path / "imgs" / c, [smooth_image(rng, 8, 8) for _ in range(2)], ".jpg")
    return tmp_path / "imgs"


@pytest.fixture(scope="module")
def long_list(tmp_path_factory) -> tuple[Path, Path]:
    """8 small JPEGs listed 40,000 times: a build of several seconds."""
    tmp = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(0)
    names = write_images(tmp / "root", [smooth_image(rng, 16, 16) for _ in range(8)], ".jpg")
    (tmp / "list.txt").write_text("".join(f"{names[i % 8]} {i % 8}\n" for i in range(40000)))
    return tmp / "root", tmp / "list.txt"


def start_build(long_list, db: Path) -> subprocess.Popen:
    """A CLI build of ``db`` in a real process, returned once its temporary folder exists."""
    root, listfile = long_list
    cmd = [sys.executable, "-m", "resnet_imagenet", "convert_imageset", "--no-progress", "--jobs", "1",
           str(root), str(listfile), str(db)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not temporaries(db.parent, db.name):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    return proc


# --- case 1: two runs into one target ---


@pytest.mark.slow
def test_a_db_made_while_another_run_builds_is_kept_and_the_late_run_refuses(long_list, classes_root, tmp_path):
    db = tmp_path / "out" / "db"
    db.parent.mkdir()
    proc = start_build(long_list, db)
    try:
        (theirs,) = temporaries(db.parent, "db")
        mine = convert_imageset(classes_root, None, db, jobs=1, progress=False)  # finishes first, reports written
        assert mine.written == 6
        assert theirs.exists(), "the live build's temporary was removed"
        assert proc.wait(timeout=300) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read().strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"resnet-imagenet convert_imageset: error: {db} appeared while"), err
    assert len(records(db)) == 6 and read_meta(db)["count"] == 6  # the first-reported DB, untouched
    assert read_classes(db) == ["cat", "dog", "eel"]
    assert sorted(p.name for p in db.parent.iterdir()) == ["db", "db.classes.txt"]  # no temporary left


@pytest.mark.parametrize("syscall", [True, False], ids=["renameat2", "fallback"])
def test_rename_noreplace_never_replaces(tmp_path, monkeypatch, syscall):
    import resnet_imagenet.util.atomic as atomic
    from resnet_imagenet.util.atomic import rename_noreplace

    if not syscall:
        monkeypatch.setattr(atomic, "_renameat2", lambda *a: False)  # a file system without RENAME_NOREPLACE
    for kind in ("dir", "file"):
        src, dst = tmp_path / f"src_{kind}", tmp_path / f"dst_{kind}"
        if kind == "dir":
            src.mkdir()
            (src / "a").write_text("new")
            dst.mkdir()
            (dst / "a").write_text("old")
        else:
            src.write_text("new")
            dst.write_text("old")
        with pytest.raises(FileExistsError):
            rename_noreplace(src, dst)
        assert (dst / "a" if kind == "dir" else dst).read_text() == "old" and src.exists()
        rename_noreplace(src, tmp_path / f"free_{kind}")
        assert not src.exists()


# --- case 2: --overwrite replaces only an LMDB, never the inputs ---


def test_overwrite_never_replaces_root_a_folder_holding_it_a_user_folder_or_a_file(classes_root, tmp_path):
    before = tree(tmp_path)
    for target, why in [
        (classes_root, "it is the input"),
        (tmp_path, "it holds the input"),
    ]:
        proc = cli("convert_imageset", "--no-progress", "--overwrite", str(classes_root), str(target))
        assert proc.returncode == 1 and len(error_lines(proc)) == 1, proc.stderr
        assert f"{target}: not replaced by the new LMDB: {why} {classes_root}" in proc.stderr
        assert tree(tmp_path) == before  # every image still there
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.mdb").write_text("not really")
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    (tmp_path / "afile").write_text("precious")
    for target, why in [("mine", "it holds 'notes.txt', which is no part of a LMDB"), ("afile", "it is a file")]:
        proc = cli("convert_imageset", "--no-progress", "--overwrite", str(classes_root), str(tmp_path / target))
        assert proc.returncode == 1 and why in proc.stderr and len(error_lines(proc)) == 1, proc.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    assert (tmp_path / "afile").read_text() == "precious"


def test_overwrite_replaces_our_lmdb_and_a_caffe_one(classes_root, tmp_path):
    ours, caffe = tmp_path / "ours", tmp_path / "caffe"
    convert_imageset(classes_root, None, ours, jobs=1, progress=False)
    env = lmdb.open(str(caffe))  # Caffe's: data.mdb + lock.mdb, nothing else
    with env.begin(write=True) as txn:
        txn.put(b"x", b"y")
    env.close()
    assert sorted(os.listdir(caffe)) == ["data.mdb", "lock.mdb"]
    (classes_root / "eel" / "img000.jpg").unlink()
    for db in (ours, caffe):
        s = convert_imageset(classes_root, None, db, jobs=1, progress=False, overwrite=True)
        assert s.written == 5 and len(records(db)) == 5
    assert sorted(os.listdir(ours)) == ["classes.txt", "data.mdb", "lock.mdb", META_NAME]  # no owner record


def test_every_replace_flag_refuses_a_user_folder_and_keeps_force_as_an_alias(tmp_path):
    from resnet_imagenet.cli import build_parser

    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    (tmp_path / "w.pth").write_bytes(b"")
    commands = {
        "prune": [
            "prune",
            "--model",
            "m.prototxt",
            "--weights",
            "w.caffemodel",
            "--data",
            "db",
            "--speedup",
            "2",
            "--out",
            str(user),
        ],  # fmt: skip
        "import_torchvision": [
            "import_torchvision",
            "--arch",
            "resnet50",
            "--weights",
            str(tmp_path / "w.pth"),
            "--out",
            str(user),
        ],  # fmt: skip
        "demo_data": ["demo_data", str(user)],
    }
    for name, argv in commands.items():
        for flag in ("--overwrite", "--force"):
            assert build_parser(name).parse_args([*argv, flag]).overwrite is True
            rc = main([*argv, flag])
            assert rc == 1, name
        assert (user / "thesis.tex").read_text() == "precious" and os.listdir(user) == ["thesis.tex"], name


def test_demo_data_overwrite_replaces_an_earlier_demo_dataset(tmp_path):
    from resnet_imagenet.tools.demo_data import write_demo_dataset

    write_demo_dataset(tmp_path / "d", train_per_class=1, val_per_class=1)
    m = write_demo_dataset(tmp_path / "d", train_per_class=2, val_per_class=1, overwrite=True)
    assert m["train_per_class"] == 2 and len((tmp_path / "d" / "train.txt").read_text().splitlines()) == 20


# --- case 8: a killed build's temporaries ---


@pytest.mark.slow
def test_a_later_build_removes_a_killed_builds_temporary_and_says_so(long_list, classes_root, tmp_path):
    from resnet_imagenet.util.atomic import OWNER_NAME

    db = tmp_path / "db"
    proc = start_build(long_list, db)
    (left,) = temporaries(tmp_path, "db")
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert left.is_dir() and json.loads((left / OWNER_NAME).read_text())["pid"] == proc.pid
    other_host = tmp_path / ".db.tmp-1-other"  # another host's live build on a shared folder
    other_host.mkdir()
    (other_host / OWNER_NAME).write_text(json.dumps({"host": "elsewhere.example", "pid": 1}))
    done = cli("convert_imageset", "--no-progress", str(classes_root), str(db))
    assert done.returncode == 0, done.stderr
    said = [ln for ln in done.stderr.splitlines() if "removed" in ln]
    assert len(said) == 1 and str(left) in said[0] and f"process {proc.pid} that died" in said[0], done.stderr
    assert not left.exists() and other_host.is_dir()
    assert len(records(db)) == 6


def test_stale_temporaries_by_pid_only_dead_ones_go(tmp_path):
    from resnet_imagenet.util.atomic import remove_stale_temporaries

    dead = subprocess.Popen(["true"])
    dead.wait()
    old = tmp_path / f".db.tmp-{dead.pid}-abc"  # an older build's: no owner record, the pid in the name
    live = tmp_path / f".db.tmp-{os.getppid()}-def"
    other = tmp_path / f".db2.tmp-{dead.pid}-ghi"  # another target's
    for p in (old, live, other):
        p.mkdir()
        (p / "data.mdb").write_bytes(b"x" * 10)
    assert remove_stale_temporaries(tmp_path / "db") == [old]
    assert live.is_dir() and other.is_dir() and not old.exists()


# --- case 4, 5 (tar part), 7 (tar part): crafted and truncated ILSVRC tars ---


def jpeg(rng) -> bytes:
    return cv2.imencode(".jpg", smooth_image(rng, 16, 16))[1].tobytes()


def tar_bytes(members: list[tuple[str, bytes | str]]) -> bytes:
    """A tar of (name, bytes) files and (name, "->target") symlinks, in this order (duplicates kept)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data.removeprefix("->")
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def crafted(tmp_path) -> Path:
    """n01.tar (3 images, one name twice), a symlink n02.tar -> n01.tar, n03.tar, and n01.tar again."""
    rng = np.random.default_rng(0)
    n01 = tar_bytes([("n01_0.JPEG", jpeg(rng)), ("n01_1.JPEG", jpeg(rng)), ("n01_0.JPEG", jpeg(rng))])
    n03 = tar_bytes([("n03_0.JPEG", jpeg(rng)), ("n03_0.JPEG", "->n03_1.JPEG")])
    train = tar_bytes([("n01.tar", n01), ("n02.tar", "->n01.tar"), ("n03.tar", n03), ("n01.tar", n01)])
    (tmp_path / "train.tar").write_bytes(train)
    return tmp_path / "train.tar"


@pytest.mark.parametrize("shuffle", [False, True])
def test_crafted_train_tar_links_and_duplicates_are_skipped_and_the_count_is_the_dbs(crafted, tmp_path, shuffle):
    res = convert_imagenet(tmp_path / "out", train_tar=crafted, shuffle=shuffle, progress=False, jobs=1)["train"]
    db = tmp_path / "out" / "ilsvrc12_train_lmdb"
    got = sorted((k[9:], lab) for k, lab in records(db))
    assert got == [("n01/n01_0.JPEG", 0), ("n01/n01_1.JPEG", 0), ("n03/n03_0.JPEG", 1)]  # n02 is no class
    assert read_classes(db) == ["n01", "n03"] and read_meta(db)["classes"] == ["n01", "n03"]
    assert res.written == 3 and read_meta(db)["count"] == 3
    reasons = sorted((f.rsplit(":", 1)[-1], r) for f, r in res.skipped)
    assert reasons == [
        ("n01.tar", "a second tar of this synset"),
        ("n01.tar/n01_0.JPEG", "duplicate member name (the first one is kept)"),
        ("n02.tar", "not a synset tar (a symlink)"),
        ("n03.tar/n03_0.JPEG", "not a regular file (a symlink)"),
    ]
    assert read_meta(db)["skipped"] == 4


def test_the_summary_counts_the_records_in_the_db_not_the_writes(tmp_path):
    rng = np.random.default_rng(0)
    buf = jpeg(rng)
    tasks = [("a.jpg", 0, buf, ConvertOptions()), ("a.jpg", 1, buf, ConvertOptions())]  # the same key twice
    s = build_db(tasks, tmp_path / "db", ConvertOptions(), keys=lambda i, name: 0, jobs=1, progress=False)
    assert s.written == 1 and read_meta(tmp_path / "db")["count"] == 1
    assert records(tmp_path / "db") == [("00000000_a.jpg", 1)]


def test_a_tar_member_over_the_cap_is_skipped_unread(tmp_path):
    rng = np.random.default_rng(0)
    big = os.urandom((1 << 20) + 1)  # 1 MiB and a byte: over --max-member-mb 1
    members = [("ILSVRC2012_val_00000001.JPEG", jpeg(rng)), ("ILSVRC2012_val_00000002.JPEG", big)]
    (tmp_path / "val.tar").write_bytes(tar_bytes(members))
    (tmp_path / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000002.JPEG 1\n")
    proc = cli("convert_imagenet", "--no-progress", "--jobs", "1", "--val-tar", str(tmp_path / "val.tar"),
               "--val-labels", str(tmp_path / "val.txt"), "--synsets", str(tmp_path / "val.txt"),
               "--max-member-mb", "1", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"ILSVRC2012_val_00000002.JPEG: skipped: too large: {len(big)} bytes (over --max-member-mb 1)" in (
        proc.stderr
    )
    assert "val: written 1, skipped 1 (1 too large)" in proc.stdout
    assert [k for k, _ in records(tmp_path / "out" / "ilsvrc12_val_lmdb")] == ["00000000_ILSVRC2012_val_00000001.JPEG"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_truncated_tar_is_one_line_naming_it(crafted, tmp_path, split):
    rng = np.random.default_rng(1)
    if split == "val":
        val = [(f"ILSVRC2012_val_{k:08d}.JPEG", jpeg(rng)) for k in range(1, 4)]
        full = tar_bytes(val)
        (tmp_path / "val.txt").write_text("".join(f"{n} 0\n" for n, _ in val))
        flags = ["--val-labels", str(tmp_path / "val.txt"), "--synsets", str(tmp_path / "val.txt")]
    else:
        full, flags = crafted.read_bytes(), []
    cut = tmp_path / f"{split}_cut.tar"
    cut.write_bytes(full[: 2100 if split == "val" else len(full) // 2 + 100])  # inside the 2nd image / 3rd member
    proc = cli("convert_imagenet", "--no-progress", "--jobs", "1", f"--{split}-tar", str(cut), *flags,
               str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and err.startswith(f"resnet-imagenet convert_imagenet: error: {cut}"), (
        proc.stderr
    )
    assert "truncated or not a tar (unexpected end of data)" in err
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").iterdir() if "lmdb" in p.name]


# --- case 9: the class list from another DB or a synsets file ---


def test_val_missing_a_class_folder_takes_the_train_labels(classes_root, tmp_path):
    train = tmp_path / "train_lmdb"
    convert_imageset(classes_root, None, train, jobs=1, progress=False)
    val = tmp_path / "val"
    rng = np.random.default_rng(2)
    for c in ("cat", "eel"):  # no dog/
        write_images(val / c, [smooth_image(rng, 8, 8)], ".jpg")
    proc = cli("convert_imageset", "--no-progress", "--classes-from", str(train), str(val), str(tmp_path / "val_lmdb"))
    assert proc.returncode == 0, proc.stderr
    assert records(tmp_path / "val_lmdb") == [("00000000_cat/img000.jpg", 0), ("00000001_eel/img000.jpg", 2)]
    assert read_classes(tmp_path / "val_lmdb") == ["cat", "dog", "eel"]
    synsets = tmp_path / "synset_words.txt"
    synsets.write_text("eel an eel, Anguilla\ncat house cat\ndog\n")  # ILSVRC's synset_words.txt: the first word
    s = convert_imageset(val, None, tmp_path / "val2", classes=synsets, jobs=1, progress=False)
    assert s.written == 2 and records(tmp_path / "val2") == [("00000000_eel/img000.jpg", 0),
                                                            ("00000001_cat/img000.jpg", 1)]  # fmt: skip
    assert read_classes(tmp_path / "val2") == ["eel", "cat", "dog"]


def test_a_folder_not_in_the_class_list_is_refused_in_one_line(classes_root, tmp_path):
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    proc = cli("convert_imageset", "--no-progress", "--classes", str(tmp_path / "two.txt"), str(classes_root),
               str(tmp_path / "db"))  # fmt: skip
    assert proc.returncode == 1 and not (tmp_path / "db").exists()
    assert proc.stderr.strip() == (
        f"resnet-imagenet convert_imageset: error: {classes_root / 'eel'}: class folder not in the class list of "
        f"{tmp_path / 'two.txt'} (2 classes; 1 such folders)"
    )
    listdb = tmp_path / "list_lmdb"
    rng = np.random.default_rng(3)
    names = write_images(tmp_path / "flat", [smooth_image(rng, 8, 8) for _ in range(2)], ".jpg")
    (tmp_path / "list.txt").write_text(f"{names[0]} 1\n{names[1]} 2\n")
    proc = cli("convert_imageset", "--no-progress", "--classes-from", str(listdb), str(tmp_path / "flat"),
               str(tmp_path / "list.txt"), str(tmp_path / "x"))  # fmt: skip
    assert proc.returncode == 1 and "no such DB (--classes-from)" in proc.stderr
    s = convert_imageset(tmp_path / "flat", tmp_path / "list.txt", listdb, classes=tmp_path / "two.txt", jobs=1,
                         progress=False)  # fmt: skip
    assert s.written == 1 and s.skipped == [(names[1], f"label 2 outside the 2 classes of {tmp_path / 'two.txt'}")]
    assert read_classes(listdb) == ["cat", "dog"]


def test_list_and_class_files_of_random_bytes_give_items_or_one_line(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from resnet_imagenet.data.imagelist import read_class_file, read_list

    f = tmp_path / "f.txt"

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
    def check(data: bytes) -> None:
        f.write_bytes(data)
        items, bad = read_list(f)
        assert all(isinstance(n, str) and n and isinstance(lab, int) for n, lab in items)
        assert all(w.startswith(f"{f}:") for w, _ in bad)
        try:
            names = read_class_file(f)
        except ValueError as e:
            assert str(e).startswith(str(f)) and "\n" not in str(e)
        else:
            assert names and len(set(names)) == len(names) and all(n and not any(c.isspace() for c in n) for n in names)

    check()
