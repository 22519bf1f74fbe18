"""``train``: Caffe's ``caffe train`` -- one process, or one per GPU under torchrun (./train.sh)."""

from __future__ import annotations

import argparse
import logging

from resnet_imagenet.tools import add_command
from resnet_imagenet.util.glog import error_line


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "train",
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from resnet_imagenet.train.snapshot import SnapshotError
    from resnet_imagenet.train.trainer import TrainingDiverged, TrainOptions, train

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
        error_line(f"resnet-imagenet train: error: {e}")
        return 3
    except SnapshotError as e:
        error_line(f"resnet-imagenet train: error: {e}")
        return 1
