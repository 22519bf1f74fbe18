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
    p = sub.add_parser(
        "train",
        help="train a net with Caffe's solver (one process, or one per GPU under torchrun / ./train.sh)",
        description="caffe train: SGD/Nesterov/Adam from a solver prototxt, _iter_N snapshots, exact resume.",
    )
    p.add_argument("--solver", required=True, help="solver prototxt (paths inside resolve from the cwd, as Caffe)")
    p.add_argument("--snapshot", help="resume from a .solverstate (its .caffemodel is found beside it)")
    p.add_argument("--weights", help="fine-tune from .caffemodel(s), comma separated (not with --snapshot)")
    p.add_argument("--gpu", help="cpu, cpu:N, all, or GPU ids like 0,1,2,3 (one process per GPU); default: GPUs if any")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="GPU: no mixed precision (fp32)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="GPU: NCHW memory layout")
    p.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false", help="GPU: fixed conv kernels")
    p.add_argument(
        "--sync-bn", action="store_true", help="BatchNorm statistics over all processes (Caffe: per process)"
    )
    p.add_argument("--workers", type=int, help="data loader processes per training process (default: from CPU count)")
    p.add_argument("--sigint-effect", default="stop", choices=["stop", "snapshot", "none"], help="default: stop")
    p.add_argument(
        "--sighup-effect", default="snapshot", choices=["stop", "snapshot", "none"], help="default: snapshot"
    )
    p.add_argument("--check", action="store_true", help="validate solver, nets, data, weights and GPUs, then exit")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from resnet_imagenet.train import TrainingDiverged, TrainOptions, train

    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs; the others only warn
    opts = TrainOptions(
        solver=args.solver, snapshot=args.snapshot, weights=args.weights, gpu=args.gpu, amp=args.amp,
        channels_last=args.channels_last, cudnn_benchmark=args.cudnn_benchmark, sync_bn=args.sync_bn,
        workers=args.workers, sigint_effect=args.sigint_effect, sighup_effect=args.sighup_effect, check=args.check,
    )  # fmt: skip
    try:
        return train(opts)
    except TrainingDiverged as e:
        print(f"resnet-imagenet train: error: {e}", file=sys.stderr)
        return 3


# --- pruning: prune ----------------------------------------------------------------------------


def _add_prune_commands(sub: argparse._SubParsersAction) -> None:
    pass


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
