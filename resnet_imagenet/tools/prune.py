"""``prune``: channel pruning (He et al., ICCV 2017) of a trained net into a new model folder.

This tool reads the sampled images (data/'s DataFeed through the net's data layer) and hands them to
prune.export.run as a tensor; the flags' defaults are run's.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from resnet_imagenet.tools import _flags, add_command
from resnet_imagenet.util.atomic import check_replaceable

if TYPE_CHECKING:
    import torch

    from resnet_imagenet.proto import caffe_pb2

log = logging.getLogger(__name__)


def load_images(
    layer: caffe_pb2.LayerParameter, data: str | os.PathLike, mean: str | os.PathLike | None, n: int, seed: int
) -> torch.Tensor:
    """``n`` images (or all there are) from ``data``, shuffled by ``seed``, through ``layer``'s transform."""
    import torch

    from resnet_imagenet.data.feed import DataFeed
    from resnet_imagenet.proto import caffe_pb2

    lp = caffe_pb2.LayerParameter()
    lp.CopyFrom(layer)
    if lp.type == "Data":
        lp.data_param.source = str(Path(data).resolve())
        lp.data_param.batch_size = min(n, 32)
    elif lp.type == "ImageData":
        lp.image_data_param.source = str(Path(data).resolve())
        lp.image_data_param.batch_size = min(n, 32)
    else:
        raise ValueError(f"layer '{lp.name}': --data needs a Data or ImageData layer, not {lp.type}")
    if mean is not None:
        lp.transform_param.mean_file = str(Path(mean).resolve())
        lp.transform_param.ClearField("mean_value")
    out, got = [], 0
    with DataFeed(lp, "train", seed=seed, num_workers=0) as feed:  # TRAIN: a seeded random subset
        for x, _ in feed.epoch(0):
            out.append(x[: n - got])
            got += len(out[-1])
            if got >= n:
                break
    return torch.cat(out)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from resnet_imagenet.prune.export import run as prune_run

    d = {k: v.default for k, v in inspect.signature(prune_run).parameters.items()}
    p = add_command(
        sub,
        "prune",
        description="Prune the inner channels of ResNet bottlenecks (branch2a/2b) and plain conv chains "
        "(He, Zhang & Sun, ICCV 2017) and write train_val/deploy prototxts, the pruned caffemodel, a "
        "fine-tune solver and prune_report.json into --out (all or nothing).",
    )
    p.add_argument("--model", required=True, help="train_val prototxt (its TEST data layer's transform reads --data)")
    p.add_argument("--weights", required=True, help="trained .caffemodel of --model")
    p.add_argument("--data", required=True, help="LMDB (or ImageData list) to sample feature maps from")
    p.add_argument("--mean", help="mean.binaryproto (default: the data layer's mean_file / mean_value)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--speedup", type=float, help="reach at least this MAC reduction with a uniform keep ratio")
    g.add_argument(
        "--widths", help="'released' (the published ResNet-50-2X widths) or a prototxt whose num_output to copy"
    )
    p.add_argument("--out", required=True, help="output folder, e.g. prototxt_like/resnet_50_2x")
    p.add_argument("--method", choices=["lasso", "l1"], default=d["method"], help="l1: filter-norm baseline, no refit")
    p.add_argument("--images", type=int, default=d["images"], help=f"images to sample (default {d['images']})")
    p.add_argument(
        "--points-per-image",
        dest="points",
        type=int,
        default=d["points"],
        help=f"random positions per image (default {d['points']})",
    )
    p.add_argument(
        "--batch", type=int, default=d["batch"], help=f"images per forward pass while sampling (default {d['batch']})"
    )
    p.add_argument("--seed", type=int, default=d["seed"])
    _flags.add_gpu_flag(p, default="CPU")
    p.add_argument("--device", help=argparse.SUPPRESS)  # deprecated: a torch device (cpu, cuda); use --gpu
    _flags.add_overwrite_flag(p, "the --out folder of an earlier prune (holding only the files prune writes)")
    p.add_argument(
        "--filter-input",
        action="store_true",
        help="also prune the block input each branch2a reads, through a Filter layer in front of it (as the "
        "released ResNet-50-2X): --widths' Filter widths, or with --speedup the inner widths' keep ratio",
    )
    p.add_argument(
        "--round",
        dest="round_to",
        type=int,
        default=d["round_to"],
        metavar="N",
        help="round every kept channel count UP to a multiple of N (8 suits vectorized / tensor-core kernels); "
        f"with --speedup the target still holds (default {d['round_to']}: no rounding)",
    )
    p.add_argument(
        "--residual",
        type=float,
        default=d["residual"],
        metavar="KEEP",
        help="also prune the residual channels (branch1/branch2c outputs and the block outputs they sum into), "
        "one mask per stage keeping this ratio of them (e.g. 0.75); default: keep them all (the paper's scheme)",
    )
    p.set_defaults(func=run)


def _device(args: argparse.Namespace) -> str:
    """The torch device: --gpu (one GPU id, or cpu), or the deprecated --device as given."""
    if args.device is None:
        return _flags.one_device(args.gpu)
    if args.gpu is not None:
        raise ValueError("give --gpu or the deprecated --device, not both")
    log.warning("--device is deprecated; use --gpu (cpu or a GPU id)")
    return args.device


def run(args: argparse.Namespace) -> int:
    from resnet_imagenet.prune.export import format_report
    from resnet_imagenet.prune.export import run as prune_run

    def sample(layer: caffe_pb2.LayerParameter, n: int, seed: int) -> torch.Tensor:
        return load_images(layer, args.data, args.mean, n, seed)

    if args.overwrite:  # only an earlier prune's folder, never one holding the inputs
        name = Path(args.out).name
        ours = ("train_val.prototxt", "deploy.prototxt", f"{name}_pruned.caffemodel", f"{name}_solver.prototxt")
        check_replaceable(args.out, "prune output", (*ours, "prune_report.json"), required=["prune_report.json"],
                          protect=[args.model, args.weights, args.data])  # fmt: skip
    report = prune_run(
        args.model,
        args.weights,
        args.data,
        args.out,
        sample=sample,
        speedup=args.speedup,
        widths=args.widths,
        method=args.method,
        images=args.images,
        points=args.points,
        seed=args.seed,
        batch=args.batch,
        device=_device(args),
        force=args.overwrite,
        filter_input=args.filter_input,
        round_to=args.round_to,
        residual=args.residual,
    )
    print(format_report(report))
    print(f"wrote {args.out}/ (peak RSS while pruning {report['peak_rss_mb']:.0f} MB)")
    return 0
