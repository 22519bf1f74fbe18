"""The loader's checks of records against the net: record sizes (the mean's, a batch's) and label ranges.

At setup they read what convert recorded in the DB (META_NAME: the label range, the record sizes), so
``train --check`` finds a label past num_output or records of the wrong size before training starts;
at run time an odd-sized record is skipped like a corrupt one (feed.py) and a label out of range is one
line naming the DB and the record.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from resnet_imagenet.data.db import META_NAME, read_classes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def check_sizes(
    layer: str, source: Path, c: dict, batch: int, meta: dict | None, img: np.ndarray | None,
    mean: np.ndarray | None, mean_file: str,
) -> None:  # fmt: skip
    """Sets ``c["size"]``, the (H, W) every record must have, and checks the build's record sizes against it.

    caffe: data_transformer.cpp CHECK_EQ(datum_height, data_mean_.height()) -- with a full-size mean_file
    every record has the mean's size; without crop_size a batch's records have record 0's. ``img`` is
    record 0 (None: unreadable).
    """
    if c["new_dim"] or c["rrc"]:
        return  # sizes vary by design: resized first
    if mean_file and mean is not None and not (c["crop"] and mean.shape[1:] == (c["crop"], c["crop"])):
        c["size"], c["size_from"] = tuple(mean.shape[-2:]), f"the size of mean_file {mean_file}"
        if problem := resized_mean_problem(layer, source, meta, c["size"], mean_file):
            raise ValueError(problem)
        if img is not None and img.shape[:2] != c["size"]:
            raise ValueError(
                f"layer '{layer}': {mean_file}: mean_file is {c['size']} but record 0 of {source} is "
                f"{img.shape[:2]}; the mean must have the records' size"
            )
    elif not c["crop"] and batch > 1 and img is not None:
        c["size"], c["size_from"] = img.shape[:2], "record 0's size: without crop_size a batch's records match"
    shapes = (meta or {}).get("shapes")
    if not c["size"] or not shapes:
        return
    want = "x{}x{}".format(*c["size"])
    odd = sum(n for s, n in shapes.items() if not s.endswith(want))
    if odd == sum(shapes.values()):
        raise ValueError(
            f"layer '{layer}': {source}: no record is {want[1:]} ({c['size_from']}); its {META_NAME} lists "
            f"{', '.join(shapes)}"
        )
    if odd:
        log.warning("%s: %d records are not %s (%s): they will be skipped", source, odd, want[1:], c["size_from"])


def resized_mean_problem(layer: str, source: Path, meta: dict | None, mean_hw: tuple, mean_file: str) -> str | None:
    """A full-size mean over a DB built with --min_dim (records of many sizes, per the build's META_NAME): most
    records cannot take it (caffe: data_transformer.cpp CHECK_EQ(datum_height, data_mean_.height()))."""
    shapes, min_dim = (meta or {}).get("shapes") or {}, ((meta or {}).get("options") or {}).get("min_dim")
    want = "x{}x{}".format(*mean_hw)
    fits, total = sum(n for s, n in shapes.items() if s.endswith(want)), sum(shapes.values())
    if not min_dim or fits == total:
        return None
    return (
        f"layer '{layer}': {mean_file} is a full-size {want[1:]} mean, but {source} was built with --min_dim "
        f"{min_dim} ({fits} of its {total} records are {want[1:]}; its {META_NAME} lists {', '.join(shapes)}): "
        "use mean_value (compute_image_mean logs the per-channel values) or a mean of crop_size"
    )


def check_meta_labels(layer: str, source: Path, meta: dict | None, classes: int, ignore: int | None, what: str) -> None:
    """The build's label range (META_NAME) must fit [0, classes) (``ignore`` aside)."""
    names = read_classes(source)
    if names is not None and len(names) != classes:
        log.warning("%s: %d classes in its class list, %d in %s", source, len(names), classes, what)
    rng = (meta or {}).get("labels")
    if rng and any(x != ignore and not 0 <= x < classes for x in (rng["min"], rng["max"])):
        raise ValueError(
            f"layer '{layer}': {source}: labels {rng['min']}..{rng['max']} (its {META_NAME}) do not fit {what}: "
            f"expected 0..{classes - 1}"
        )


def check_batch_labels(
    source: Path, labels: torch.Tensor, index: torch.Tensor, classes: int, ignore: int | None, what: str
) -> None:
    """A batch's labels (on the CPU, before they reach the loss) must lie in [0, classes) or be ``ignore``."""
    bad = (labels < 0) | (labels >= classes)
    if ignore is not None:
        bad &= labels != ignore
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{source}: record {int(index[i])} has label {int(labels[i])}, outside 0..{classes - 1} of {what}"
        )
