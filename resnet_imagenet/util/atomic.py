"""Crash-safe writes: a file or folder goes to a temporary name beside its target, then is renamed into place.

Used for every output a later run or tool reads back: snapshots and solver states, caffemodels and
exports, prototxts, mean files, LMDBs and image folders (built as a temporary folder), the logs
tool's tables and plots; streams such as a run's log file are written in place. A kill at any
moment leaves either the old file (or nothing) or the complete new one, never a half-written file
under the final name (timm's CheckpointSaver and Caffe users' habit of keeping the last good snapshot).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def temp_prefix(name: str, pid: int | None = None) -> str:
    """``.<name>.tmp-<pid>-``: a temporary names its writer, so a later run can tell a dead one's leftovers."""
    return f".{name}.tmp-{os.getpid() if pid is None else pid}-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    On an exception the temporary file or folder is removed and ``path`` is untouched.
    A folder target that already exists is replaced only after the new one is complete.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = temp_prefix(final.name)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir:
            # mkdtemp makes 0700 folders; give the result the usual mode so other users (and a
            # Caffe in a container under another uid) can read it
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
    except BaseException:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
