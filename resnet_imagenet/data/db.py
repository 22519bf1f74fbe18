"""Read-only LMDB opening shared by the loader (data.py) and compute_image_mean (mean.py), without torch."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb

_OPEN: dict[tuple[int, str], list] = {}  # (pid, path) -> [environment, users]: lmdb opens a path once per process


def open_lmdb(path: str | os.PathLike) -> lmdb.Environment:
    """Open an LMDB read-only, safe for many reader processes (no lock file writes); release with close_lmdb."""
    key = (os.getpid(), os.path.realpath(path))
    if key in _OPEN:
        _OPEN[key][1] += 1
        return _OPEN[key][0]
    if not (Path(path) / "data.mdb").is_file():
        raise FileNotFoundError(f"{path}: not an LMDB (no data.mdb)")
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
    _OPEN[key] = [env, 1]
    return env


def close_lmdb(path: str | os.PathLike) -> None:
    """Release one open_lmdb of ``path``; the environment closes when its last user releases it."""
    key = (os.getpid(), os.path.realpath(path))
    if key in _OPEN:
        _OPEN[key][1] -= 1
        if _OPEN[key][1] == 0:
            _OPEN.pop(key)[0].close()
