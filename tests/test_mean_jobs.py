"""compute_image_mean --jobs: exact integer sums per key range, so N processes give one process's bits."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest
from _images import make_db

from resnet_imagenet.cli import main
from resnet_imagenet.data.datum import datum_to_array, parse_datum
from resnet_imagenet.data.mean import compute_image_mean


def _float64_mean(db) -> np.ndarray:
    """The mean as the one-process tool computed it before --jobs: float64 running sum in key order."""
    env = lmdb.open(str(db), readonly=True, lock=False)
    total, n = None, 0
    with env.begin() as txn:
        for _, v in txn.cursor():
            img = datum_to_array(parse_datum(v))
            total = img.astype(np.float64) if total is None else total + img
            n += 1
    env.close()
    return (total / n).transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.slow
def test_jobs_give_the_same_bits_as_one_process(tmp_path):
    rng = np.random.default_rng(0)
    db = make_db(tmp_path, [rng.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(37)])
    files = []
    for jobs in (1, 2, 3):
        out = tmp_path / f"mean{jobs}.binaryproto"
        assert main(["compute_image_mean", "--no-progress", "--jobs", str(jobs), str(db), str(out)]) == 0
        files.append(out.read_bytes())
    assert files[0] == files[1] == files[2]
    got = compute_image_mean(db, progress=False, jobs=2)
    assert got.tobytes() == _float64_mean(db).tobytes()


@pytest.mark.slow
def test_a_size_change_in_a_later_range_is_named(tmp_path):
    imgs = [np.full((6, 6, 3), i, np.uint8) for i in range(15)] + [np.zeros((5, 6, 3), np.uint8)]
    db = make_db(tmp_path, imgs)
    with pytest.raises(ValueError, match=r"records differ in size, so give --crop"):
        compute_image_mean(db, progress=False, jobs=2)
    assert compute_image_mean(db, progress=False, jobs=2, crop=4).shape == (1, 3, 4, 4)
