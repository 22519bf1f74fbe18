"""A loader worker's RSS does not grow toward the DB size: consumed values are unmapped (records.drop_pages)."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest
from _pagecache import mapped

from resnet_imagenet.data import records as R
from resnet_imagenet.data.datum import encode_datum


def _db(path, n=1500):
    rng = np.random.default_rng(0)
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i in range(n):  # ~20 kB raw Datums: overflow pages
            txn.put(b"%08d_%d.png" % (i, i), encode_datum(rng.integers(0, 256, (100, 68, 3), dtype=np.uint8), i))
    env.close()


@pytest.mark.slow
@pytest.mark.parametrize("advise", [True, False])
def test_reading_every_record_keeps_the_map_out_of_rss(tmp_path, monkeypatch, advise):
    _db(tmp_path / "db")
    if not advise:  # the measure can tell: without the advice the whole DB ends up in RSS
        monkeypatch.setattr(R, "drop_pages", lambda view: None)
    recs = R.Records(tmp_path / "db", is_list=False)
    for i in range(recs.n):
        recs.load(i, 3)
    m = mapped(tmp_path / "db" / "data.mdb")
    size_kb = (tmp_path / "db" / "data.mdb").stat().st_size // 1024
    recs.close()
    assert m.get("Private_Dirty", 0) == 0  # clean file pages only, never private memory
    if advise:
        assert m["Rss"] < size_kb // 20, (m, size_kb)
    else:
        assert m["Rss"] > size_kb // 2, (m, size_kb)
