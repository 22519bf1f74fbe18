"""The ``resnet-imagenet`` command: one subcommand per Caffe tool. The only module that reads argv.

Subcommands are grouped by area; each handler imports its module lazily so that ``--help`` and
light commands (parse_log) start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("resnet_imagenet")


class CaffeFormatter(logging.Formatter):
    """glog's line prefix, as Caffe prints it: ``I0111 18:29:31.675417 31329 solver.cpp:228] msg``.

    Caffe's tools/extra/parse_log.py reads the time from this prefix, so our logs keep it.
    """

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1e6)
        prefix = (
            f"{record.levelname[0]}{time.strftime('%m%d %H:%M:%S', t)}.{micros:06d} "
            f"{record.process} {record.filename}:{record.lineno}]"
        )
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return f"{prefix} {msg}"


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CaffeFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


# --- networks: summary, time -------------------------------------------------------------------


def _add_net_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="per-layer top shapes, parameters and multiply-adds of a net")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--phase", default="test", choices=["train", "test"])
    p.add_argument("--batch", type=int, default=1, help="batch size to report shapes for (default 1)")
    p.set_defaults(func=_cmd_summary)


def _cmd_summary(args: argparse.Namespace) -> int:
    from resnet_imagenet.profile import print_summary

    print_summary(args.model, phase=args.phase, batch=args.batch)
    return 0


# --- data: convert_imageset, convert_imagenet, valprep, compute_image_mean ----------------------


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    pass


# --- training: train ---------------------------------------------------------------------------


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    pass


# --- pruning: prune ----------------------------------------------------------------------------


def _add_prune_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="channel pruning (LASSO selection + least-squares reconstruction) into a new model folder",
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
    p.add_argument("--method", choices=["lasso", "l1"], default="lasso", help="l1: filter-norm baseline, no refit")
    p.add_argument("--images", type=int, default=500, help="images to sample (default 500)")
    p.add_argument("--points-per-image", type=int, default=10, help="random positions per image (default 10)")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass while sampling (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device for the forward passes (cpu, cuda)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_prune)


def _cmd_prune(args: argparse.Namespace) -> int:
    from resnet_imagenet.prune_export import format_report, run

    report = run(
        args.model, args.weights, args.data, args.out, speedup=args.speedup, widths=args.widths, mean=args.mean,
        method=args.method, images=args.images, points=args.points_per_image, seed=args.seed, batch=args.batch,
        device=args.device, force=args.force,
    )  # fmt: skip
    print(format_report(report))
    print(f"wrote {args.out}/ (peak RSS while pruning {report['peak_rss_mb']:.0f} MB)")
    return 0


# --- using models: test, classify, parse_log, plot_log, demo -----------------------------------


def _add_use_commands(sub: argparse._SubParsersAction) -> None:
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-imagenet",
        description="Caffe's tools for ResNets on ImageNet, running on PyTorch.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_net_commands(sub)
    _add_data_commands(sub)
    _add_train_commands(sub)
    _add_prune_commands(sub)
    _add_use_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        # Bad input: one clear line, no traceback (use -v for one).
        if args.verbose:
            log.exception("failed")
        print(f"resnet-imagenet {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
