"""Caffe's image lists: the ``relative/path label`` list file and the ROOT/<class>/ folder walk.

One reader for both users of the format: convert_imageset (data/convert.py) and the ImageData
layer's records (data/records.py). caffe: tools/convert_imageset.cpp, image_data_layer.cpp.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_list(path: str | os.PathLike) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """A Caffe list file: ``relative/path label`` per line -> (items, bad lines as (file:line, reason)).

    caffe: convert_imageset.cpp -- the label follows the last space, so paths may contain spaces.
    """
    items, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip()  # "a.jpg 3 " is a good line too
            if not line:
                continue
            name, _, label = line.rpartition(" ")
            try:
                value = int(label)
            except ValueError:
                value = None
            if not name or value is None:
                bad.append((f"{path}:{n}", f"bad list line: no integer label in {line!r}"))
                continue
            if "\x00" in name:  # no file name holds a NUL byte (POSIX); open() would raise ValueError
                bad.append((f"{path}:{n}", f"bad list line: a NUL byte in the file name {name!r}"))
                continue
            if not -(2**31) <= value < 2**31:  # caffe.proto: Datum.label is an int32
                bad.append((f"{path}:{n}", f"bad list line: label {value} out of the int32 range"))
                continue
            items.append((name, value))
    return items, bad


def walk_classes(
    root: str | os.PathLike, classes: list[str] | None = None, source: str = ""
) -> tuple[list[tuple[str, int]], list[str]]:
    """ROOT/<class>/**/file -> (items labelled by the class's index among the sorted class names, classes).

    ``classes`` (read from ``source``, e.g. the train DB's list): label by the index in that list instead;
    a class without a folder has no images, a folder not in the list is refused.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class subfolders (give a list file, or put images in ROOT/<class>/)")
    if classes is not None:
        unknown = [f for f in folders if f not in set(classes)]
        if unknown:
            raise ValueError(
                f"{root / unknown[0]}: class folder not in the class list of {source} ({len(classes)} classes; "
                f"{len(unknown)} such folders)"
            )
    classes = folders if classes is None else classes
    items = []
    for label, cls in enumerate(classes):
        if not (root / cls).is_dir():
            continue
        for dirpath, dirs, files in os.walk(root / cls):
            dirs.sort()
            rel = Path(dirpath).relative_to(root).as_posix()
            items.extend((f"{rel}/{f}", label) for f in sorted(files) if not f.startswith("."))
    return items, classes


def read_class_file(path: str | os.PathLike) -> list[str]:
    """A class list file, one class a line in label order: the first word of each line (ILSVRC's synsets.txt,
    synset_words.txt, a DB's classes.txt); blank lines are skipped."""
    names: dict[str, int] = {}
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.split():
            continue
        name = line.split()[0]
        if name in names:
            raise ValueError(f"{path}:{n}: class {name!r} listed twice (first on line {names[name]})")
        names[name] = n
    if not names:
        raise ValueError(f"{path}: no class names in it")
    return list(names)


def in_range(
    items: list[tuple[str, int]], bad: list[tuple[str, str]], classes: list[str], source: str
) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """A list file's items whose label indexes ``classes`` (from ``source``); the others go to ``bad``."""
    out = [(n, lab) for n, lab in items if 0 <= lab < len(classes)]
    bad = bad + [(n, f"label {lab} outside the {len(classes)} classes of {source}") for n, lab in items
                 if not 0 <= lab < len(classes)]  # fmt: skip
    return out, bad


def escapes_root(name: str) -> bool:
    """Whether a list entry points outside ROOT (absolute, or up through ``..``)."""
    norm = os.path.normpath(name)
    return os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep)


def classes_path(db: str | os.PathLike) -> Path:
    """Where the class list of a folder-walked DB goes: beside it, ``<db>.classes.txt``."""
    db = Path(db)
    return db.with_name(db.name + ".classes.txt")
