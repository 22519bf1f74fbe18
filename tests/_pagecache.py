"""Page-cache residency of a file (mincore on a fresh map), and dropping its clean pages (posix_fadvise)."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def drop(path: os.PathLike) -> None:
    """Ask the kernel to forget the file's clean cached pages (no root needed; pages mapped elsewhere stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path: os.PathLike) -> tuple[int, int]:
    """(pages of the file in the page cache, pages of the file)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    n = -(-size // mmap.PAGESIZE)
    vec = np.zeros(n, np.uint8)
    view = np.frombuffer(mm, np.uint8)
    rc = _libc.mincore(view.ctypes.data, size, vec.ctypes.data)
    del view
    mm.close()
    if rc:
        raise OSError(ctypes.get_errno(), "mincore")
    return int((vec & 1).sum()), n


def mapped(path: os.PathLike) -> dict[str, int]:
    """kB of this process's maps of ``path`` by /proc/self/smaps field (Rss, Shared_Clean, Private_Dirty, ...)."""
    out: dict[str, int] = {}
    inside = False
    target = os.path.realpath(path)
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's header line
                inside = len(parts) >= 6 and parts[-1] == target
            elif inside and parts[0].endswith(":") and len(parts) == 3 and parts[2] == "kB":
                out[parts[0][:-1]] = out.get(parts[0][:-1], 0) + int(parts[1])
    return out
