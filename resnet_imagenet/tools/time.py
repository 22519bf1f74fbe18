"""``time``: Caffe's ``caffe time`` -- average forward and backward time per layer and per iteration."""

from __future__ import annotations

import argparse
import inspect

from resnet_imagenet.net.timing import time_net
from resnet_imagenet.tools import add_command
from resnet_imagenet.tools._flags import add_gpu_flag, one_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    defaults = {k: v.default for k, v in inspect.signature(time_net).parameters.items()}
    p = add_command(sub, "time")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument(
        "--iterations",
        type=int,
        default=defaults["iterations"],
        help=f"timed iterations (default {defaults['iterations']}, as caffe time)",
    )
    add_gpu_flag(p, default="CPU")
    p.add_argument(
        "--phase",
        default=defaults["phase"],
        choices=["train", "test"],
        help=f"default {defaults['phase']}, as caffe time",
    )
    p.add_argument("--batch", type=int, default=defaults["batch"], help="batch size (default: the data layers' own)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = one_device(args.gpu)
    time_net(args.model, iterations=args.iterations, device=device, phase=args.phase, batch=args.batch)
    return 0
