"""``train``: Caffe's ``caffe train`` -- one process, or one per GPU under torchrun (./train.sh)."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from resnet_imagenet.tools import add_command
from resnet_imagenet.tools._flags import add_gpu_flag
from resnet_imagenet.util.glog import error_line


def add_parser(sub: argparse._SubParsersAction) -> None:
    from resnet_imagenet.train.options import TrainOptions
    from resnet_imagenet.train.signals import EFFECTS

    d = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    p = add_command(
        sub,
        "train",
        description="caffe train: Caffe's solvers from a solver prototxt, snapshots Caffe resumes, exact resume.",
    )
    a = p.add_argument
    a("--solver", required=True, help="solver prototxt (paths inside resolve from the cwd, as Caffe)")
    a("--snapshot", default=d["snapshot"], help="resume from a .solverstate (its .caffemodel is found beside it)")
    a("--weights", default=d["weights"], help="fine-tune from .caffemodel(s), comma separated (not with --snapshot)")
    add_gpu_flag(p, default="GPUs if any, else CPU")  # TrainOptions.gpu None: GPUs if any (one process per GPU)
    for dest, help_ in (
        ("amp", "no mixed precision (fp32)"),
        ("channels_last", "NCHW memory layout"),
        ("cudnn_benchmark", "GPU: fixed conv kernels"),
    ):
        a("--no-" + dest.replace("_", "-"), dest=dest, action="store_false", default=d[dest], help=help_)
    a("--amp-dtype", default=d["amp_dtype"], choices=["auto", "bf16", "fp16"],
      help="auto: bf16 on a GPU that has it, else fp16 with a gradient scaler; fp32 on the CPU. "
      "bf16 / fp16: that autocast on any device, the CPU too (fp16 with torch's GradScaler)")  # fmt: skip
    cl_help = "NHWC also on the CPU (default: on a GPU only)"
    a("--channels-last", dest="channels_last", action="store_true", default=d["channels_last"], help=cl_help)
    a(
        "--sync-bn",
        action="store_true",
        default=d["sync_bn"],
        help="BatchNorm statistics over all processes (Caffe: per process)",
    )
    a(
        "--workers",
        type=int,
        default=d["workers"],
        help="data loader processes per training process (default: from CPU count)",
    )
    a(
        "--data-order",
        default=d["data_order"],
        choices=["keys", "shuffle"],
        help="TRAIN Data layers: keys = Caffe's LMDB key order, ranks interleaved (default); "
        "shuffle = a new permutation every epoch",
    )
    for sig in ("sigint", "sighup", "sigterm"):
        default = d[f"{sig}_effect"]
        a(f"--{sig}-effect", default=default, choices=list(EFFECTS), help=f"default: {default}")
    a(
        "--max-memory",
        dest="max_memory_gb",
        type=float,
        default=d["max_memory_gb"],
        metavar="GB",
        help="refuse a net needing more memory than this (default: the GPU's, or this machine's; 0: no check)",
    )
    a(
        "--check",
        action="store_true",
        default=d["check"],
        help="validate solver, nets, data, weights and GPUs, then exit (every problem found, one line each)",
    )
    p.set_defaults(func=run)


def _solver_weights(opts):
    """The solver's own ``weights:`` (SolverParameter field 42) when neither --weights nor --snapshot is given.

    caffe: tools/caffe.cpp train() -- --snapshot clears the solver's weights, --weights replaces them; else
    Solver::InitTrainNet copies each into the TRAIN net (paths from the working directory).
    """
    if opts.weights or opts.snapshot or not opts.solver:
        return opts
    from resnet_imagenet.proto.text import read_solver

    try:
        weights = list(read_solver(opts.solver).weights)
    except (OSError, ValueError):  # the check and the trainer report a bad solver in their own words
        return opts
    return dataclasses.replace(opts, weights=",".join(weights)) if weights else opts


def run(args: argparse.Namespace) -> int:
    import os

    from resnet_imagenet.train.options import TrainOptions
    from resnet_imagenet.train.snapshot import SnapshotError
    from resnet_imagenet.train.trainer import TrainingDiverged, train

    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs; the others only warn
    opts = _solver_weights(TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)}))
    if opts.check:
        from resnet_imagenet.train.check import check

        problems = check(opts)
        for p in problems:
            error_line(f"resnet-imagenet train: error: {p}")
        return 1 if problems else 0
    try:
        return train(opts)
    except TrainingDiverged as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops alike, with the same message: print it once
            error_line(f"resnet-imagenet train: error: {e}")
        return 3
    except SnapshotError as e:
        error_line(f"resnet-imagenet train: error: {e}")
        return 1
