"""``summary``: per-layer top shapes, learnable parameters and multiply-adds of a net."""

from __future__ import annotations

import argparse

from resnet_imagenet.tools import add_command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "summary")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--phase", default="test", choices=["train", "test"])
    p.add_argument("--batch", type=int, default=1, help="batch size to report shapes for (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resnet_imagenet.net.profile import print_summary

    print_summary(args.model, phase=args.phase, batch=args.batch)
    return 0
