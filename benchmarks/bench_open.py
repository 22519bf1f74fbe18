"""Figure: opening an LMDB for the loader (Records), dense '%08d_' keys vs keys with holes, cold page cache.

Builds two LMDBs of N records of ~4 kB (ImageNet's small-JPEG size, each value on its own overflow
page): keys 0..N-1 (the dense fast path) and keys with every 1000th number missing (the key scan).
Each open runs in a fresh process after POSIX_FADV_DONTNEED on data.mdb; prints seconds, peak RSS and
the share of data.mdb read (mincore), and the same for the old way (py-lmdb's keys-only cursor).
Usage: python benchmarks/bench_open.py [--n 1281167] [--quick] [--no-cursor] [--root CHECKOUT] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lmdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _pagecache import drop  # noqa: E402

CHILD = """
import json, resource, sys, time
import lmdb, numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from _pagecache import resident
from resnet_imagenet.data.records import Records
db, how = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if how == "cursor":
    env = lmdb.open(db, readonly=True, lock=False, readahead=False)
    with env.begin() as txn:
        keys = np.array(list(txn.cursor().iternext(values=False)))
    n = len(keys)
else:
    n = Records(__import__("pathlib").Path(db), is_list=False).n
dt = time.perf_counter() - t
got, pages = resident(db + "/data.mdb")
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"n": n, "s": dt, "peak_rss_mb": rss, "read": got / pages}}))
"""


def build(db: Path, n: int, holes: bool) -> None:
    if (db / "data.mdb").is_file():
        return
    value = os.urandom(4000)
    env = lmdb.open(str(db), map_size=max(1 << 30, n * 8300), sync=False)
    txn = env.begin(write=True)
    for i in range(n):
        if holes and i % 1000 == 999:
            continue
        txn.put(b"%08d_n%08d/%08d.JPEG" % (i, i // 1300, i), value, append=True)
        if i % 50000 == 49999:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.sync(True)
    env.close()


def measure(db: Path, how: str, root: Path = ROOT) -> dict:
    """One cold open of ``db`` in a fresh process, with the package of the checkout ``root``."""
    drop(db / "data.mdb")
    code = CHILD.format(root=str(root), tests=str(ROOT / "tests"))
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code, str(db), how], check=True, capture_output=True, env=env)
    return json.loads(out.stdout.decode().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1281167, help="records (default: ImageNet's train set)")
    ap.add_argument("--quick", action="store_true", help="20,000 records: check that the script runs")
    ap.add_argument("--no-cursor", action="store_true", help="leave out the old way (py-lmdb's cursor: ~2 min)")
    ap.add_argument("--root", type=Path, default=ROOT, help="open with this checkout's package (an A/B: git worktree)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "resnet_imagenet_bench")
    args = ap.parse_args()
    n = 20000 if args.quick else args.n
    runs = (("dense", False, "records"), ("holes", True, "records"), ("holes", True, "cursor"))
    for name, holes, how in runs[:2] if args.no_cursor else runs:
        db = args.workdir / f"open_{name}_{n}"
        db.mkdir(parents=True, exist_ok=True)
        build(db, n, holes)
        r = measure(db, how, args.root)
        what = {"records": "Records()", "cursor": "py-lmdb keys-only cursor (before)"}[how]
        print(f"{name:5s} {what:34s} {r['n']:>9,d} keys  {r['s']:7.3f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
              f"data.mdb read {100 * r['read']:5.1f}%")  # fmt: skip
    print("(cold page cache each; data.mdb read = pages resident after the open, mincore)")


if __name__ == "__main__":
    main()
