"""``compute_image_mean``: Caffe's tool -- the per-pixel BGR mean of an LMDB as a .binaryproto."""

from __future__ import annotations

import argparse

from resnet_imagenet.tools import add_command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "compute_image_mean")
    p.add_argument("db", metavar="DB")
    p.add_argument("out", metavar="OUT", nargs="?", help="mean.binaryproto to write")
    p.add_argument("--crop", type=int, default=0, help="average the centre CROP x CROP (e.g. 224, as bgr.binaryproto)")
    p.add_argument("--legacy", action="store_true", help="write num/channels/height/width instead of shape")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resnet_imagenet.data.mean import compute_image_mean

    compute_image_mean(args.db, args.out, crop=args.crop, legacy=args.legacy, progress=args.progress)
    return 0
