"""Flags shared by several tools: the ONE --gpu flag, and Caffe's convert flags (convert_imageset, convert_imagenet)."""

from __future__ import annotations

import argparse

GPU_FORMS = "cpu, cpu:N (N CPU processes, train only), all, or GPU ids like 0,1,2,3"


def add_gpu_flag(p: argparse.ArgumentParser, default: str) -> None:
    """The one --gpu flag of every tool that runs a net (Caffe's -gpu spelling); ``default`` says what None means."""
    p.add_argument("--gpu", default=None, metavar="GPUS", help=f"{GPU_FORMS}; default: {default}")


def one_device(gpu: str | None) -> str:
    """--gpu of a one-process tool as a torch device: None or cpu is the CPU (Caffe without -gpu), else one GPU id."""
    from resnet_imagenet.train.dist import parse_gpus

    ids = parse_gpus("cpu" if gpu is None else str(gpu))
    return "cpu" if ids is None else f"cuda:{ids[0]}"


def add_convert_flags(p: argparse.ArgumentParser) -> None:
    """Caffe's convert_imageset flags (also as -flag=value, the gflags spelling) and ours."""
    a = p.add_argument
    a("--resize_height", "-resize_height", type=int, default=0, help="resize to this height (with --resize_width)")
    a("--resize_width", "-resize_width", type=int, default=0, help="resize to this width (with --resize_height)")
    a("--min_dim", type=int, default=0, help="shrink so the shorter side is this, aspect kept (recommended: 256)")
    a("--shuffle", "-shuffle", action="store_true", help="shuffle the order of the records (seeded by --seed)")
    a("--seed", type=int, default=0, help="seed of --shuffle (default 0)")
    a("--gray", "-gray", action="store_true", help="store gray images")
    a("--encoded", "-encoded", action="store_true", help="store the encoded image file instead of raw pixels")
    a("--encode_type", "-encode_type", default="", help="re-encode as this (jpg, png...); default: keep the file's")
    a("--check_size", "-check_size", action="store_true", help="skip images whose size differs from the first's")
    a("--backend", "-backend", default="lmdb", choices=["lmdb"], help="only lmdb")
    a("--jobs", type=int, default=None, help="decode/resize processes (default: all cores)")
    a("--overwrite", action="store_true", help="replace an existing database")
    a("--strict", action="store_true", help="fail (and write nothing) if any image is skipped")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def convert_options(args: argparse.Namespace):
    from resnet_imagenet.data.convert import ConvertOptions

    if bool(args.resize_height) != bool(args.resize_width):
        raise ValueError("give both --resize_height and --resize_width (or --min_dim)")
    return ConvertOptions(
        resize_height=args.resize_height, resize_width=args.resize_width, min_dim=args.min_dim, gray=args.gray,
        encoded=args.encoded, encode_type=args.encode_type, check_size=args.check_size,
    )  # fmt: skip
