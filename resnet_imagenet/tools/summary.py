"""``summary``: per-layer top shapes, learnable parameters and multiply-adds of a net."""

from __future__ import annotations

import argparse
import inspect
import os
from typing import TYPE_CHECKING

from resnet_imagenet.tools import add_command

if TYPE_CHECKING:
    from resnet_imagenet.net.cost import Summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    defaults = {k: v.default for k, v in inspect.signature(print_summary).parameters.items()}
    p = add_command(sub, "summary")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--phase", default=defaults["phase"], choices=["train", "test"])
    batch = defaults["batch"]
    p.add_argument("--batch", type=int, default=batch, help=f"batch size to report shapes for (default {batch})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print_summary(args.model, phase=args.phase, batch=args.batch)
    return 0


def _shape(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s)) if s else "scalar"


def print_summary(model_path: str | os.PathLike, phase: str = "test", batch: int = 1) -> Summary:
    """Print ``summarize``'s table and totals to stdout (the ``summary`` command)."""
    from resnet_imagenet.data.shapes import data_input_shapes
    from resnet_imagenet.net.cost import summarize
    from resnet_imagenet.net.phase import filter_net
    from resnet_imagenet.proto.text import parse_phase, read_net

    # caffe: a data layer's top shape comes from its first record (where the source is here)
    shapes = data_input_shapes(filter_net(read_net(model_path), parse_phase(phase)).layer, missing_ok=True)
    s = summarize(model_path, phase, batch, shapes)
    width = max(len(x.name) for x in s.layers) + 2
    print(f"{s.name or model_path}: phase {phase}, batch {batch}")
    print(f"{'layer':{width}}{'type':18}{'top shape':22}{'params':>14}{'MACs':>18}")
    for x in s.layers:
        tops = ", ".join(_shape(t) for t in x.top_shapes)
        print(f"{x.name:{width}}{x.type:18}{tops:22}{x.params:>14,}{x.macs:>18,}")
    print(f"Total learnable parameters: {s.params:,}")
    short = f"{s.macs / 1e9:.2f} G" if s.macs >= 1e8 else f"{s.macs / 1e6:.2f} M"
    print(f"Total MACs: {s.macs:,} ({short}) for batch {batch}")
    return s
