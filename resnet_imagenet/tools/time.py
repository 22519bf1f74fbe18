"""``time``: Caffe's ``caffe time`` -- average forward and backward time per layer and per iteration."""

from __future__ import annotations

import argparse

from resnet_imagenet.tools import add_command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "time")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--iterations", type=int, default=50, help="timed iterations (default 50, as caffe time)")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device id (default: CPU)")
    p.add_argument("--phase", default="train", choices=["train", "test"], help="default train, as caffe time")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the data layers' own)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from resnet_imagenet.net.timing import time_net

    time_net(args.model, iterations=args.iterations, gpu=args.gpu, phase=args.phase, batch=args.batch)
    return 0
