"""convert_imageset: images (a class-folder tree or a Caffe list file) -> an LMDB of Caffe Datums.

Decoding and resizing (data/encode.py) run in a process pool (data/pool.py); records are written by one process in
list order, under keys ``%08d_<relative path>`` (caffe: tools/convert_imageset.cpp), so a real Caffe
DataLayer reads the database unchanged. The database is built under a temporary name and renamed
when complete (data/db.py); metadata goes to a JSON file inside the DB folder, never into the LMDB.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from resnet_imagenet._version import __version__
from resnet_imagenet.data.autojobs import run_auto
from resnet_imagenet.data.db import CLASSES_NAME, MAX_KEY, META_NAME, create_lmdb
from resnet_imagenet.data.encode import ConvertOptions, Result, Task, work
from resnet_imagenet.data.imagelist import classes_path, escapes_root, in_range, read_list, walk_classes
from resnet_imagenet.data.pool import WorkerDied
from resnet_imagenet.data.target import class_list, count_records, lmdb_target
from resnet_imagenet.util.atomic import atomic_write_text
from resnet_imagenet.util.interrupt import Interrupted, interruptible

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Summary:
    """What a build did: records written, inputs skipped (file, reason), bytes stored, wall time."""

    written: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, reason)
    bytes: int = 0
    seconds: float = 0.0
    labels: list[int] = dataclasses.field(default_factory=list)  # [min, max] of the written records' labels
    shapes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # "CxHxW" -> records

    def report(self) -> str:
        reasons = collections.Counter(r.split(":")[0] for _, r in self.skipped)
        why = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        per = self.bytes / self.written if self.written else 0
        rate = self.written / self.seconds if self.seconds else 0
        return (
            f"written {self.written}, skipped {len(self.skipped)}{f' ({why})' if why else ''}, "
            f"{self.bytes / 1e6:.1f} MB ({per / 1e3:.1f} kB/image), {self.seconds:.1f} s ({rate:.0f} img/s)"
        )


def _records(
    results: Iterable[Result], opts: ConvertOptions, summary: Summary, keys: Callable[[int, str], int] | None, bar: tqdm
) -> Iterator[tuple[bytes, bytes]]:
    """The workers' results -> (key, datum) to store; a skipped input goes to ``summary.skipped`` and the log."""
    first_shape = None
    for name, label, datum, reason, shape in results:
        bar.update()
        if datum is not None and opts.check_size:
            first_shape = first_shape or shape
            if shape != first_shape:
                datum, reason = None, f"size mismatch: {shape} differs from the first image's {first_shape}"
        key = b"%08d_%s" % (keys(summary.written, name) if keys else summary.written, name.encode())
        if datum is not None and len(key) > MAX_KEY:
            datum, reason = None, "path too long for an LMDB key"
        if datum is None:
            summary.skipped.append((name, reason))
            log.warning("%s: skipped: %s", name, reason)
            continue
        summary.written += 1
        summary.bytes += len(datum)
        lo, hi = summary.labels or (label, label)
        summary.labels = [min(lo, label), max(hi, label)]
        summary.shapes["x".join(map(str, shape))] += 1
        yield key, datum


def _check(db: Path, summary: Summary, strict: bool) -> None:
    if summary.written == 0:
        raise ValueError(f"{db}: nothing written, all {len(summary.skipped)} inputs were skipped")
    if strict and summary.skipped:
        f, r = summary.skipped[0]
        raise ValueError(f"{db}: --strict and {len(summary.skipped)} inputs were skipped (first: {f}: {r})")


def _meta(summary: Summary, opts: ConvertOptions, extra: dict | None) -> str:
    """The JSON kept beside the records (META_NAME): who wrote the DB, with what options, from what."""
    info = {
        "tool": "resnet-imagenet",
        "version": __version__,
        "count": summary.written,
        "skipped": len(summary.skipped),
        "bytes": summary.bytes,
        # what train checks against the net before it starts (data/feed.py): label range, record sizes
        "labels": {"min": summary.labels[0], "max": summary.labels[1]} if summary.labels else None,
        "shapes": dict(summary.shapes.most_common(32)),
        "options": dataclasses.asdict(opts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    return json.dumps(info, indent=1) + "\n"


def _write(out, tasks: Iterable[Task], opts, summary: Summary, keys, jobs: int | None, bar: tqdm) -> None:
    """The records of ``tasks`` into the open writer ``out``, decoded on ``jobs`` processes."""
    try:
        for key, datum in _records(run_auto(work, tasks, jobs), opts, summary, keys, bar):
            out.put(key, datum)
    finally:
        bar.close()


def build_db(
    tasks: Iterable[Task],
    db: str | os.PathLike,
    opts: ConvertOptions,
    *,
    total: int | None = None,
    jobs: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    skipped: list[tuple[str, str]] | None = None,
    meta: dict | None = None,
    keys: Callable[[int, str], int] | None = None,
    progress: bool = True,
    map_size: int = 1 << 30,
    protect: Iterable[str | os.PathLike] = (),
) -> Summary:
    """Write the Datums of ``tasks`` (in order) to a new LMDB ``db``; return what happened.

    ``keys(i, name)`` may give the record number of the i-th written image (default: i).
    Raises ValueError when nothing was written, or with ``strict`` when anything was skipped; FileExistsError
    when ``db`` exists without ``overwrite`` (also when another run made it meanwhile), or is no LMDB, or
    is or holds a ``protect`` path (the inputs).
    """
    db = Path(db)
    check = lmdb_target(db, overwrite, protect)
    summary = Summary(skipped=skipped if skipped is not None else [])  # the caller may append while streaming
    for f, reason in summary.skipped:
        log.warning("%s: skipped: %s", f, reason)
    t0 = time.time()
    try:
        # SIGINT / SIGTERM raise Interrupted: the workers are killed, the temporary DB removed (create_lmdb)
        with interruptible(), create_lmdb(db, append=keys is None, map_size=map_size, overwrite=overwrite,
                                          check=check) as out:  # fmt: skip
            _write(out, tasks, opts, summary, keys, jobs, tqdm(total=total, unit="img", disable=not progress,
                                                               desc=db.name, smoothing=0.05))  # fmt: skip
            summary.written = count_records(out, db, summary.written)
            _check(db, summary, strict)
            atomic_write_text(out.folder / META_NAME, _meta(summary, opts, meta))
            if (meta or {}).get("classes"):  # inside the DB folder: renamed into place with the records
                atomic_write_text(out.folder / CLASSES_NAME, "".join(c + "\n" for c in meta["classes"]))
    except WorkerDied as e:  # the temporary DB is removed (create_lmdb)
        raise WorkerDied(f"{db} not written: {e}") from None
    except Interrupted as e:
        raise e.with_message(
            f"{db} not written ({summary.written} records were; the temporary DB is removed)"
        ) from None
    summary.seconds = time.time() - t0
    log.info("%s: %s", db, summary.report())
    return summary


def convert_imageset(
    root: str | os.PathLike,
    listfile: str | os.PathLike | None,
    db: str | os.PathLike,
    opts: ConvertOptions | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    jobs: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
    classes: str | os.PathLike | None = None,
    classes_from: str | os.PathLike | None = None,
) -> Summary:
    """Caffe's convert_imageset: ROOT + LISTFILE (or ROOT/<class>/ folders) -> LMDB ``db``.

    ``classes`` (a class file) or ``classes_from`` (a DB): label ROOT's folders by that list, recorded in the DB.
    """
    opts = opts or ConvertOptions()
    if not Path(root).is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    given = class_list(classes, classes_from)
    if listfile is not None:
        items, bad = read_list(listfile)
        classes = given and given[0]
        if given:
            items, bad = in_range(items, bad, *given)
    else:
        items, classes = walk_classes(root, *(given or (None,)))
        bad = []
    if shuffle:
        random.Random(seed).shuffle(items)  # caffe: --shuffle shuffles the list before writing
    bad += [(n, "path escapes ROOT") for n, _ in items if escapes_root(n)]
    items = [(n, lab) for n, lab in items if not escapes_root(n)]
    tasks = ((n, lab, os.path.join(root, n), opts) for n, lab in items)
    meta = {
        "source": str(root),
        "list": str(listfile) if listfile else None,
        "shuffle": shuffle,
        "seed": seed,
        "classes": classes,
    }
    summary = build_db(
        tasks,
        db,
        opts,
        total=len(items),
        skipped=bad,
        meta=meta,
        jobs=jobs,
        overwrite=overwrite,
        strict=strict,
        progress=progress,
        protect=[p for p in (root, listfile) if p is not None],
    )
    if classes is not None:
        # the old place beside the DB, still written for existing scripts; readers take the DB's own
        # (db.read_classes), which a kill between the two renames cannot pair with another run's
        atomic_write_text(classes_path(db), "".join(c + "\n" for c in classes))
    return summary
