"""convert_imagenet --shuffle fixes each record's number up front: skipped images must not leave holes."""

from __future__ import annotations

import io
import tarfile

import cv2
import lmdb
import numpy as np
from _images import smooth_image

from resnet_imagenet.data.db import close_key_holes
from resnet_imagenet.data.imagenet import convert_imagenet
from resnet_imagenet.data.records import Records


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _keys(db) -> list[bytes]:
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        keys = list(txn.cursor().iternext(values=False))
    env.close()
    return keys


def test_shuffled_train_with_bad_images_has_dense_keys(tmp_path):
    rng = np.random.default_rng(0)
    synsets = ["n01440764", "n01443537"]
    inner = {}
    for s in synsets:
        files = {f"{s}_{k}.JPEG": cv2.imencode(".jpg", smooth_image(rng, 20, 24))[1].tobytes() for k in range(6)}
        files[f"{s}_bad.JPEG"] = b"not a jpeg"  # skipped: its number would be a hole
        inner[s] = _tar(files)
    (tmp_path / "train.tar").write_bytes(_tar({f"{s}.tar": inner[s] for s in synsets}))
    res = convert_imagenet(tmp_path / "out", train_tar=tmp_path / "train.tar", shuffle=True, seed=3, progress=False)
    db = tmp_path / "out" / "ilsvrc12_train_lmdb"
    keys = _keys(db)
    assert res["train"].written == 12 and len(res["train"].skipped) == 2
    assert [k[:8] for k in keys] == [b"%08d" % i for i in range(12)]
    names = sorted(k[9:] for k in keys)
    assert names == sorted(b"%s/%s_%d.JPEG" % (s.encode(), s.encode(), k) for s in synsets for k in range(6))
    assert [k[9:] for k in keys] != names  # still shuffled
    recs = Records(db, is_list=False)
    assert recs.keys is None  # the dense fast path


def test_close_key_holes_moves_the_tail_into_the_holes(tmp_path):
    env = lmdb.open(str(tmp_path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in (0, 2, 3, 5, 7):
            txn.put(b"%08d_f%d" % (i, i), b"v%d" % i)
    env.close()
    assert close_key_holes(tmp_path) == 2
    env = lmdb.open(str(tmp_path), readonly=True, lock=False)
    with env.begin() as txn:
        items = list(txn.cursor())
    env.close()
    # numbers 5 and 7 lie past n = 5: they take the free 1 and 4, keeping their names and values
    assert items == [(b"00000000_f0", b"v0"), (b"00000001_f5", b"v5"), (b"00000002_f2", b"v2"),
                     (b"00000003_f3", b"v3"), (b"00000004_f7", b"v7")]  # fmt: skip
    assert close_key_holes(tmp_path) == 0
