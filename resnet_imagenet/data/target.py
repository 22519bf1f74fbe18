"""Around a build: what ``--overwrite`` may replace (an LMDB, never the inputs), the class list it labels by
(--classes / --classes-from), and what the new DB holds.

convert_imageset and convert_imagenet (data/convert.py build_db) check the target before they start and
again at the final rename (util/atomic.py), where a DB another run made meanwhile is left as it is.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from resnet_imagenet.data.db import CLASSES_NAME, META_NAME, LmdbWriter, read_classes
from resnet_imagenet.data.imagelist import read_class_file
from resnet_imagenet.util.atomic import check_replaceable

log = logging.getLogger(__name__)

LMDB_NAMES = ("data.mdb", "lock.mdb", META_NAME, CLASSES_NAME)  # all an LMDB folder holds, ours or Caffe's


def lmdb_target(db: Path, overwrite: bool, protect: Iterable[str | os.PathLike]) -> Callable[[Path], None]:
    """Refuse (FileExistsError, one line) a ``db`` that exists without ``overwrite``, or that --overwrite may not
    replace: not an LMDB folder, or one that is or holds a ``protect`` path. Returns the check, for the rename."""
    check = functools.partial(
        check_replaceable, kind="LMDB", names=LMDB_NAMES, required=["data.mdb"], protect=list(protect)
    )
    if (db.exists() or db.is_symlink()) and not overwrite:
        raise FileExistsError(f"{db} already exists (pass --overwrite to replace it)")
    check(db)
    return check


def count_records(out: LmdbWriter, db: Path, written: int) -> int:
    """The number of records in the DB being built, from LMDB's own count: a key written twice is one record."""
    out.commit()
    entries = out.env.stat()["entries"]
    if entries != written:
        log.warning("%s: %d records replaced by later ones under the same key", db, written - entries)
    return entries


def class_list(
    classes: str | os.PathLike | None = None, classes_from: str | os.PathLike | None = None
) -> tuple[list[str], str] | None:
    """(class names in label order, where they came from): a class file (--classes) or another DB's recorded
    list (--classes-from); None when neither is given."""
    if classes is not None and classes_from is not None:
        raise ValueError("give --classes FILE or --classes-from DB, not both")
    if classes is not None:
        return read_class_file(classes), str(classes)
    if classes_from is None:
        return None
    if not Path(classes_from).is_dir():
        raise FileNotFoundError(f"{classes_from}: no such DB (--classes-from)")
    names = read_classes(classes_from)
    if not names:
        raise ValueError(f"{classes_from}: records no class list (built from a list file, or by Caffe): give --classes")
    return names, str(classes_from)
