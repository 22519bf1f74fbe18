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
        type=str.lower,  # caffe: -phase TRAIN
        default=defaults["phase"],
        choices=["train", "test"],
        help=f"default {defaults['phase']}, as caffe time",
    )
    p.add_argument("--batch", type=int, default=defaults["batch"], help="batch size (default: the data layers' own)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = one_device(args.gpu)
    from resnet_imagenet.data.shapes import data_input_shapes
    from resnet_imagenet.net.phase import filter_net
    from resnet_imagenet.proto.text import parse_phase, read_net

    # caffe: a data layer's top shape comes from its first record (where the source is here)
    layers = filter_net(read_net(args.model), parse_phase(args.phase)).layer
    shapes = data_input_shapes(layers, missing_ok=True)
    time_net(args.model, iterations=args.iterations, device=device, phase=args.phase, batch=args.batch,
             input_shapes=shapes)  # fmt: skip
    return 0
