"""``compute_image_mean``: Caffe's tool -- the per-pixel BGR mean of an LMDB as a .binaryproto."""

from __future__ import annotations

import argparse
import inspect

from resnet_imagenet.data.mean import compute_image_mean
from resnet_imagenet.tools import add_command


def add_parser(sub: argparse._SubParsersAction) -> None:
    """compute_image_mean DB [OUT]; --crop, --legacy and progress default as compute_image_mean's keywords."""
    d = {k: q.default for k, q in inspect.signature(compute_image_mean).parameters.items()}
    p = add_command(sub, "compute_image_mean")
    p.add_argument("db", metavar="DB")
    p.add_argument("out", metavar="OUT", nargs="?", help="mean.binaryproto to write")
    crop_help = "average the centre CROP x CROP (e.g. 224, as bgr.binaryproto)"
    p.add_argument("--crop", type=int, default=d["crop"], help=crop_help)
    legacy_help = "write num/channels/height/width instead of shape"
    p.add_argument("--legacy", action="store_true", default=d["legacy"], help=legacy_help)
    p.add_argument("--backend", default="lmdb", choices=["lmdb"], help="only lmdb (Caffe's -backend flag)")
    p.add_argument("--jobs", type=int, default=d["jobs"], help="processes, each a range of keys (default %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=d["progress"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    compute_image_mean(args.db, args.out, crop=args.crop, legacy=args.legacy, progress=args.progress, jobs=args.jobs)
    return 0
