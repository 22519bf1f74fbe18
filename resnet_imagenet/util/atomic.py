"""Crash-safe writes: a file or folder goes to a temporary name beside its target, then is renamed into place.

Used for every output a later run or tool reads back: snapshots and solver states, caffemodels and
exports, prototxts, mean files, LMDBs and image folders (built as a temporary folder), the logs
tool's tables and plots; streams such as a run's log file are written in place. A kill at any
moment leaves either the old file (or nothing) or the complete new one, never a half-written file
under the final name (timm's CheckpointSaver and Caffe users' habit of keeping the last good snapshot).

A folder's temporary records its writer (host and pid in OWNER_NAME inside it, the pid in its name too), so
a later write of the same target removes the leftovers of a killed writer (remove_stale_temporaries). The
final rename never replaces what another writer put there meanwhile unless asked (``overwrite``), and what
may be replaced at all is decided by check_replaceable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_NAME = ".tmp-owner.json"  # inside a folder temporary: {"host": ..., "pid": ...}; removed before the rename
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # linux: include/uapi/linux/fs.h
_AT_FDCWD = -100


def temp_prefix(name: str, pid: int | None = None) -> str:
    """``.<name>.tmp-<pid>-``: a temporary names its writer, so a later run can tell a dead one's leftovers."""
    return f".{name}.tmp-{os.getpid() if pid is None else pid}-"


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False where the C library or the file system lacks it (then the caller falls back)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, even if it appeared a moment ago.

    renameat2(RENAME_NOREPLACE) checks and renames in one step. Without it: a file is linked (link(2)
    never replaces), a folder renamed after a check -- rename(2) onto a non-empty folder fails anyway, so
    only an empty folder made in between could be replaced, and it held nothing.
    """
    try:
        if _renameat2(src, dst, RENAME_NOREPLACE):
            return
        if src.is_dir():
            if dst.exists() or dst.is_symlink():
                raise FileExistsError(errno.EEXIST, "exists", str(dst))
            os.rename(src, dst)
        else:
            os.link(src, dst)
            os.unlink(src)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put folder ``tmp`` in place of ``final``: swapped in one step (RENAME_EXCHANGE) where the system can, so
    ``final`` is never missing; else the old one is moved aside first. The old folder is then deleted."""
    if _renameat2(tmp, final, RENAME_EXCHANGE):
        old = tmp
    else:
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (someone else's counts: it is alive, only not ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(tmp: Path) -> tuple[str | None, int | None]:
    """(host, pid) of a temporary's writer: its OWNER_NAME, else the pid in its name (host unknown)."""
    try:
        rec = json.loads((tmp / OWNER_NAME).read_text())
        return str(rec["host"]), int(rec["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        m = re.search(r"\.tmp-(\d+)-", tmp.name)
        return None, int(m.group(1)) if m else None


def remove_stale_temporaries(target: str | os.PathLike, name_glob: str | None = None) -> list[Path]:
    """Remove the temporaries ``.<target>.tmp-<pid>-*`` beside ``target`` whose writer is dead; return them.

    Dead: written on this host (OWNER_NAME; one without it, from an older build or a writer killed just
    before the rename, is taken as this host's) by a pid that is not running here. A live pid -- the
    writer, or an unrelated process that got its number -- keeps it, and so does another host's.
    ``name_glob``: the temporaries of every target name it matches in that folder (default: the name itself).
    """
    target = Path(target)
    removed = []
    folder = target.parent if target.parent.is_dir() else None
    names = glob_escape(target.name) if name_glob is None else name_glob
    for tmp in sorted(folder.glob(f".{names}.tmp-*")) if folder else []:
        host, pid = _owner(tmp) if tmp.is_dir() else (None, _owner(tmp)[1])
        if pid is None or pid == os.getpid() or (host is not None and host != socket.gethostname()) or pid_alive(pid):
            continue
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else tmp.stat().st_size
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
        log.warning("removed %s (%.1f MB), left by process %d that died while writing %s", tmp, size / 1e6, pid, target)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def check_replaceable(
    path: str | os.PathLike,
    kind: str,
    names: Collection[str],
    *,
    required: Collection[str] = (),
    protect: Iterable[str | os.PathLike] = (),
) -> None:
    """Raise FileExistsError (one line) unless ``path`` may be replaced by a new ``kind``: it does not exist, or
    it is a folder (not a link) that holds only entries named by ``names`` (glob patterns) -- what we write
    there -- with all of ``required`` when it holds anything; and no ``protect`` path (the inputs: an image
    ROOT, a list file, a model) is ``path`` or inside it.
    """
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        return
    what = f"{p}: not replaced by the new {kind}:"
    real = os.path.realpath(p)
    for q in protect:
        rq = os.path.realpath(q)
        if rq == real or rq.startswith(real.rstrip(os.sep) + os.sep):
            raise FileExistsError(f"{what} it {'is' if rq == real else 'holds'} the input {q}")
    if p.is_symlink() or not p.is_dir():
        raise FileExistsError(f"{what} it is {'a link' if p.is_symlink() else 'a file'}, not a {kind}")
    entries = sorted(os.listdir(p))
    other = [e for e in entries if not any(fnmatch.fnmatchcase(e, n) for n in names)]
    if other:
        raise FileExistsError(f"{what} it holds {other[0]!r}, which is no part of a {kind} ({len(other)} such)")
    missing = [r for r in required if r not in entries]
    if entries and missing:
        raise FileExistsError(f"{what} it is not a {kind} (no {missing[0]})")


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike,
    *,
    is_dir: bool = False,
    overwrite: bool = True,
    check: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    On an exception the temporary file or folder is removed and ``path`` is untouched.
    A folder target that already exists is replaced only after the new one is complete.
    ``overwrite=False``: a ``path`` that exists at the rename (another writer's, made meanwhile) is left as it
    is and FileExistsError raised. ``check(path)`` runs on an existing ``path`` just before it is replaced
    (check_replaceable, for what appeared since the caller's own check). A folder's stale temporaries
    (remove_stale_temporaries) go first.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = temp_prefix(final.name)
    if is_dir:
        remove_stale_temporaries(final)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        (tmp / OWNER_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _finish(tmp, final, is_dir, overwrite, check)
    except BaseException:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def _finish(tmp: Path, final: Path, is_dir: bool, overwrite: bool, check: Callable[[Path], None] | None) -> None:
    """The rename that ends atomic_path."""
    if is_dir:
        (tmp / OWNER_NAME).unlink(missing_ok=True)
        # mkdtemp makes 0700 folders; give the result the usual mode so other users (and a
        # Caffe in a container under another uid) can read it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    else:
        os.chmod(tmp, 0o644)
    if not overwrite:
        try:
            rename_noreplace(tmp, final)
        except FileExistsError:
            raise FileExistsError(
                f"{final} appeared while this one was written (another run's?): left as it is, nothing written "
                "(pass --overwrite to replace it)"
            ) from None
        return
    if check is not None and (final.exists() or final.is_symlink()):
        check(final)
    if is_dir and (final.exists() or final.is_symlink()):
        _replace_dir(tmp, final)
    elif is_dir:
        os.rename(tmp, final)
    else:
        os.replace(tmp, final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
