"""What a net's data must satisfy before train / test start, each problem one line naming the file and layer.

Read from the prototxts and what convert recorded in each DB (data/db.py: META_NAME, the class list), without
decoding an image: a missing LMDB, TRAIN and TEST DBs whose class lists number the classes differently, a
classifier with fewer outputs than the DB has classes, a test pass that counts images more than once.
``problems()`` gives them all (``train --check`` prints every one); ``refuse()`` raises the first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from resnet_imagenet.data.db import META_NAME, close_lmdb, open_lmdb, read_classes, read_meta
from resnet_imagenet.data.feedcheck import resized_mean_problem
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import read_blobproto

log = logging.getLogger(__name__)

FEEDS = ("Data", "ImageData")
CONVERT_HINT = "build it with `resnet-imagenet convert_imageset ROOT/ [LISTFILE] {src}` (or convert_imagenet)"


@dataclass
class Source:
    """One Data / ImageData layer of one net, and where it reads."""

    layer: caffe_pb2.LayerParameter
    where: str  # the prototxt (and phase) the layer is in, for messages
    path: Path  # the LMDB or list file, resolved from the cwd (Caffe's rule)

    @property
    def name(self) -> str:
        return f"{self.path} (layer '{self.layer.name}' of {self.where})"

    @property
    def batch(self) -> int:
        lp = self.layer
        return lp.data_param.batch_size if lp.type == "Data" else lp.image_data_param.batch_size


def sources(net: caffe_pb2.NetParameter, where: str, base: str | os.PathLike | None = None) -> list[Source]:
    """The Data / ImageData layers of one phase's net (already filtered), with their sources."""
    root = Path(base) if base is not None else Path.cwd()
    out = []
    for lp in net.layer:
        if lp.type in FEEDS:
            src = lp.data_param.source if lp.type == "Data" else lp.image_data_param.source
            out.append(Source(lp, where, root / src))
    return out


def missing(src: Source) -> str | None:
    """A source that is not there: one line naming the layer and prototxt, and how to build it."""
    lp, p = src.layer, src.path
    if lp.type == "Data" and not (p / "data.mdb").is_file():
        what = "no LMDB there" if not p.exists() else "not an LMDB (no data.mdb)"
        return f"layer '{lp.name}' of {src.where}: source {p}: {what}; " + CONVERT_HINT.format(src=p)
    if lp.type == "ImageData" and not p.is_file():
        return f"layer '{lp.name}' of {src.where}: source {p}: no such list file"
    return None


def _db_count(src: Source) -> int | None:
    """Records in a Data layer's LMDB: convert's count (META_NAME), else the LMDB's entries."""
    meta = read_meta(src.path)
    if meta and isinstance(meta.get("count"), int):
        return meta["count"]
    env = open_lmdb(src.path)
    try:
        return int(env.stat()["entries"])
    finally:
        close_lmdb(src.path)


def class_list_problem(train: list[Source], tests: list[Source]) -> str | None:
    """TRAIN and TEST DBs whose class lists (data/db.py read_classes) give a label to different classes.

    A list that is the start of the other (a val set without the last classes) numbers alike: accepted. Where
    one side has no list (a list-file build, a Caffe DB) there is nothing to compare: said once, at info level."""
    ref = next(((s, c) for s in train if s.layer.type == "Data" and (c := read_classes(s.path)) is not None), None)
    for t in tests:
        if t.layer.type != "Data":
            continue
        theirs = read_classes(t.path)
        if ref is None or theirs is None:
            if (ref is None) != (theirs is None):
                log.info("%s or the TRAIN DB has no class list: their labels are not compared", t.path)
            continue
        s, mine = ref
        diff = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        if diff is not None:
            return (
                f"class lists differ: label {diff} is '{mine[diff]}' in TRAIN {s.name} but '{theirs[diff]}' in "
                f"TEST {t.name}; rebuild the TEST DB with the TRAIN DB's classes (convert_imageset --classes-from "
                f"{s.path})"
            )
    return None


def _producer(net: caffe_pb2.NetParameter, blob: str, before: int) -> caffe_pb2.LayerParameter | None:
    """The InnerProduct or Convolution that makes ``blob`` (through in-place layers such as Dropout)."""
    for lp in reversed(net.layer[:before]):
        if blob in lp.top:
            if lp.type in ("InnerProduct", "Convolution"):
                return lp
            if blob not in lp.bottom:
                return None  # made by another kind of layer: its class axis is not a num_output
    return None


def _db_classes(src: Source) -> tuple[int, str] | None:
    """How many classes a DB has: max label + 1 (META_NAME) or its class list's length, the larger."""
    meta, names = read_meta(src.path), read_classes(src.path)
    rng = (meta or {}).get("labels")
    counts = [(rng["max"] + 1, f"labels {rng['min']}..{rng['max']} in its {META_NAME}")] if rng else []
    counts += [(len(names), f"{len(names)} names in its class list")] if names else []
    return max(counts) if counts else None


def classifier_problems(net: caffe_pb2.NetParameter, feeds: list[Source]) -> list[str]:
    """The classifier feeding each SoftmaxWithLoss / Accuracy must have an output for every class of the DB."""
    by_top = {s.layer.top[1]: s for s in feeds if s.layer.type == "Data" and len(s.layer.top) > 1}
    out, seen = [], set()
    for i, lp in enumerate(net.layer):
        if lp.type not in ("SoftmaxWithLoss", "Accuracy") or len(lp.bottom) < 2 or lp.bottom[1] not in by_top:
            continue
        fc, src = _producer(net, lp.bottom[0], i), by_top[lp.bottom[1]]
        if fc is None or (fc.name, str(src.path)) in seen:
            continue
        seen.add((fc.name, str(src.path)))
        num = fc.inner_product_param.num_output if fc.type == "InnerProduct" else fc.convolution_param.num_output
        has = _db_classes(src)
        if has is not None and num < has[0]:
            out.append(
                f"layer '{fc.name}' of {src.where}: num_output {num} is below the {has[0]} classes of "
                f"{src.path} ({has[1]}); set num_output: {has[0]}"
            )
    return out


def test_iter_problems(sp: caffe_pb2.SolverParameter, tests: list[list[Source]]) -> list[str]:
    """test_iter x batch_size over a TEST DB's size by a whole batch or more: one test pass would count images
    more than once. test_iter = ceil(images / batch_size), a common habit, wraps only the last batch: let be."""
    out = []
    for k, feeds in enumerate(tests):
        for s in feeds:
            if s.layer.type != "Data" or k >= len(sp.test_iter):
                continue
            n, it = _db_count(s), sp.test_iter[k]
            if n is not None and it > -(-n // s.batch):
                out.append(
                    f"test_iter {it} x batch_size {s.batch} = {it * s.batch} images per test pass, but TEST "
                    f"{s.name} has {n}: images would count more than once; set test_iter: {max(1, n // s.batch)}"
                )
    return out


def mean_problems(feeds: list[Source]) -> list[str]:
    """A full-size mean_file over a --min_dim DB (data/feedcheck.py resized_mean_problem), from the mean's header
    and the build's record sizes, before a batch is made."""
    out = []
    for s in feeds:
        tp = s.layer.transform_param
        if s.layer.type != "Data" or not tp.HasField("mean_file"):
            continue
        try:
            hw = tuple(read_blobproto(Path(tp.mean_file)).shape[-2:])
        except (OSError, ValueError) as e:
            out.append(f"layer '{s.layer.name}' of {s.where}: {e}")
            continue
        if not (tp.crop_size and hw == (tp.crop_size, tp.crop_size)):
            problem = resized_mean_problem(s.layer.name, s.path, read_meta(s.path), hw, tp.mean_file)
            out += [problem] if problem else []
    return out


def net_names(sp: caffe_pb2.SolverParameter) -> tuple[str, list[str]]:
    """What to call the TRAIN net and each TEST net in a message (train/setup.py solver_nets' order)."""
    general = f"{sp.net}" if sp.HasField("net") else "the solver's net_param"
    train = f"{sp.train_net}" if sp.HasField("train_net") else "the solver's train_net_param"
    if sp.HasField("net") or sp.HasField("net_param"):
        train = general
    tests = ["the solver's test_net_param"] * len(sp.test_net_param) + list(sp.test_net)
    tests = tests or [general] * len(sp.test_iter)
    return f"{train} (TRAIN)", [f"{t} (TEST)" for t in tests]


def problems(
    sp: caffe_pb2.SolverParameter,
    train: caffe_pb2.NetParameter,
    tests: list[caffe_pb2.NetParameter],
) -> tuple[list[str], list[str]]:
    """(refusals, doubts) of a solver's nets: refusals stop train; doubts (a test pass longer than the TEST
    DB) are warnings to train and problems to ``train --check``."""
    tname, test_names = net_names(sp)
    feeds = [sources(train, tname)] + [sources(t, w) for t, w in zip(tests, test_names)]
    absent = [m for fs in feeds for s in fs if (m := missing(s))]
    if absent:
        return list(dict.fromkeys(absent)), []  # one line per layer and file; nothing else can be read
    refusals = [p for p in [class_list_problem(feeds[0], [s for fs in feeds[1:] for s in fs])] if p]
    for net, fs in zip([train, *tests], feeds):
        refusals += [p for p in classifier_problems(net, fs) + mean_problems(fs) if p not in refusals]
    return refusals, test_iter_problems(sp, feeds[1:])


def refuse(
    sp: caffe_pb2.SolverParameter,
    train: caffe_pb2.NetParameter,
    tests: list[caffe_pb2.NetParameter],
) -> None:
    """Raise the first refusal of ``problems`` (ValueError); log the doubts as warnings."""
    refusals, doubts = problems(sp, train, tests)
    if refusals:
        raise ValueError(refusals[0])
    for d in doubts:
        log.warning("%s", d)


def refuse_model(
    model: str | os.PathLike,
    net: caffe_pb2.NetParameter,
    base: str | os.PathLike | None,
    phase: int,
    level: int = 0,
    stages: tuple[str, ...] = (),
) -> None:
    """A net read for ``phase`` (``test`` of a train_val): its sources must exist, and in the TEST phase their
    class lists must match the TRAIN phase's DBs where both are there (the TRAIN DB may well be absent where a
    model is only tested)."""
    from resnet_imagenet.net.phase import filter_net
    from resnet_imagenet.proto.text import TEST, TRAIN

    name = "TEST" if phase == TEST else "TRAIN"
    feeds = sources(filter_net(net, phase, level, stages), f"{model} ({name})", base)
    absent = [m for s in feeds if (m := missing(s))]
    if absent:
        raise ValueError(absent[0])
    if phase == TEST:
        trains = [s for s in sources(filter_net(net, TRAIN), f"{model} (TRAIN)", base) if not missing(s)]
        problem = class_list_problem(trains, feeds)
        if problem:
            raise ValueError(problem)
