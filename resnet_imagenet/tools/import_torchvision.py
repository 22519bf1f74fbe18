"""``import_torchvision``: a torchvision ResNet state dict -> the zoo's v1.5 prototxts and a caffemodel."""

from __future__ import annotations

import argparse
from pathlib import Path

from resnet_imagenet.tools import add_command
from resnet_imagenet.tools._flags import add_overwrite_flag
from resnet_imagenet.util.atomic import check_replaceable


def add_parser(sub: argparse._SubParsersAction) -> None:
    from resnet_imagenet.net.tvresnet import ARCHS

    p = add_command(
        sub,
        "import_torchvision",
        description="Write deploy.prototxt, train_val.prototxt (mean_value = torchvision's mean in BGR pixels) and "
        "<arch>.caffemodel into --out; conv1 takes the channel order and std, so outputs equal torchvision's.",
    )
    p.add_argument("--arch", required=True, choices=[a for a, v in ARCHS.items() if v[2]])
    p.add_argument("--weights", required=True, help="torchvision state dict (.pth), read with weights_only=True")
    p.add_argument("--out", required=True, help="output folder")
    add_overwrite_flag(p, "an --out folder of an earlier import (holding only the files import_torchvision writes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resnet_imagenet.net.tvresnet import ARCHS, import_folder

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"{out} is not empty (use --overwrite to replace it)")
    ours = ["deploy.prototxt", "train_val.prototxt", *(f"{a}.caffemodel" for a in ARCHS)]
    check_replaceable(out, "torchvision import", ours, required=["deploy.prototxt"], protect=[args.weights])
    err = import_folder(args.arch, args.weights, out)
    print(f"wrote {out}/ (deploy.prototxt, train_val.prototxt, {args.arch}.caffemodel; max relative error {err:.2g})")
    return 0
