"""Flags shared by several tools: the ONE --gpu flag, and Caffe's convert flags (convert_imageset, convert_imagenet)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resnet_imagenet.data.convert import ConvertOptions

GPU_FORMS = "cpu, cpu:N (N CPU processes, train only), all, or GPU ids like 0,1,2,3"


def add_gpu_flag(p: argparse.ArgumentParser, default: str) -> None:
    """The one --gpu flag of every tool that runs a net (Caffe's -gpu spelling); ``default`` says what None means."""
    p.add_argument("--gpu", default=None, metavar="GPUS", help=f"{GPU_FORMS}; default: {default}")


def one_device(gpu: str | None) -> str:
    """--gpu of a one-process tool as a torch device: None or cpu is the CPU (Caffe without -gpu), else one GPU id."""
    from resnet_imagenet.train.dist import parse_gpus

    ids = parse_gpus("cpu" if gpu is None else str(gpu))
    return "cpu" if ids is None else f"cuda:{ids[0]}"


_ON = {"action": "store_true"}
# Caffe's convert_imageset flags (also as -flag=value, the gflags spelling) and ours: (names, argparse keywords,
# help). Each default is read from ConvertOptions or convert_imageset's keyword of the flag's dest; --backend,
# which no code reads, carries its own.
_CONVERT_FLAGS = (
    (("--resize_height", "-resize_height"), {"type": int}, "resize to this height (with --resize_width)"),
    (("--resize_width", "-resize_width"), {"type": int}, "resize to this width (with --resize_height)"),
    (("--min_dim",), {"type": int}, "shrink so the shorter side is this, aspect kept (recommended: 256)"),
    (("--shuffle", "-shuffle"), _ON, "shuffle the order of the records (seeded by --seed)"),
    (("--seed",), {"type": int}, "seed of --shuffle (default %(default)s)"),
    (("--gray", "-gray"), _ON, "store gray images"),
    (("--encoded", "-encoded"), _ON, "store the encoded image file instead of raw pixels"),
    (("--encode_type", "-encode_type"), {}, "re-encode as this (jpg, png...); default: keep the file's"),
    (("--check_size", "-check_size"), _ON, "skip images whose size differs from the first's"),
    (
        ("--max-pixels",),
        {"type": int, "dest": "max_pixels"},
        "skip images whose header declares more pixels "
        "(decompression bombs; default %(default)s, PIL's limit; 0: none)",
    ),
    (("--backend", "-backend"), {"default": "lmdb", "choices": ["lmdb"]}, "only lmdb"),
    (
        ("--jobs",),
        {"type": int},
        "decode/resize processes (default: 1 or all cores, whichever the first images run faster on)",
    ),
    (("--overwrite",), _ON, "replace an existing database (an LMDB folder only, never ROOT or a folder holding it)"),
    (("--strict",), _ON, "fail (and write nothing) if any image is skipped"),
    (("--no-progress",), {"dest": "progress", "action": "store_false"}, "no progress bar"),
)


def _run_defaults() -> dict:
    """convert_imageset's keyword-only parameters that are convert flags (shuffle, seed, jobs, overwrite, strict,
    progress) and their defaults; its own flags (--classes, --classes-from) are the tool's."""
    from resnet_imagenet.data.convert import convert_imageset

    dests = {kw.get("dest", names[0].lstrip("-")) for names, kw, _ in _CONVERT_FLAGS}
    params = inspect.signature(convert_imageset).parameters.values()
    return {q.name: q.default for q in params if q.kind is q.KEYWORD_ONLY and q.name in dests}


def _convert_defaults() -> dict:
    """The defaults of the convert flags: ConvertOptions' fields and convert_imageset's keywords."""
    from resnet_imagenet.data.convert import ConvertOptions

    return {**{f.name: f.default for f in dataclasses.fields(ConvertOptions)}, **_run_defaults()}


def add_convert_flags(p: argparse.ArgumentParser) -> None:
    """Caffe's convert_imageset flags (also as -flag=value, the gflags spelling) and ours."""
    d = _convert_defaults()
    for names, kw, help_text in _CONVERT_FLAGS:
        dest = kw.get("dest", names[0].lstrip("-"))
        kw = kw if "default" in kw else {**kw, "default": d[dest]}
        p.add_argument(*names, help=help_text, **kw)


def add_overwrite_flag(p: argparse.ArgumentParser, what: str) -> None:
    """The one replace flag of every tool that writes a folder: --overwrite (--force, the old name, still works)."""
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true", help=f"replace {what}")


def add_allow_missing_weights_flag(p: argparse.ArgumentParser, default: bool) -> None:
    """test's and classify's --allow-missing-weights (``default`` from the function the tool calls)."""
    p.add_argument(
        "--allow-missing-weights",
        action="store_true",
        default=default,
        help="run layers the caffemodel has no weights for on their fillers (default: refuse, naming them)",
    )


def convert_options(args: argparse.Namespace) -> ConvertOptions:
    """The ConvertOptions of parsed convert flags (each field is the flag of the same name)."""
    from resnet_imagenet.data.convert import ConvertOptions

    if bool(args.resize_height) != bool(args.resize_width):
        raise ValueError("give both --resize_height and --resize_width (or --min_dim)")
    return ConvertOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ConvertOptions)})


def convert_keywords(args: argparse.Namespace) -> dict:
    """The parsed flags of convert_imageset's keywords, which convert_imagenet takes too."""
    return {k: getattr(args, k) for k in _run_defaults()}
