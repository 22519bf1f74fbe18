"""``import_torchvision``: a torchvision ResNet state dict -> the zoo's v1.5 prototxts and a caffemodel."""

from __future__ import annotations

import argparse
from pathlib import Path

from resnet_imagenet.tools import add_command


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
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resnet_imagenet.net.tvresnet import import_folder

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{out} is not empty (use --force to replace it)")
    err = import_folder(args.arch, args.weights, out)
    print(f"wrote {out}/ (deploy.prototxt, train_val.prototxt, {args.arch}.caffemodel; max relative error {err:.2g})")
    return 0
