"""What ``resnet-imagenet train`` is given beside the solver prototxt (the flags of tools/train.py read these defaults).

Torch-free, so that ``resnet-imagenet train --help`` starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainOptions:
    """One training run: the solver prototxt and the few run knobs (the prototxt is the config)."""

    solver: str
    snapshot: str | None = None  # a .solverstate to resume from
    weights: str | None = None  # .caffemodel(s) to fine-tune from, comma separated
    gpu: str | None = None  # cpu, cpu:N, all, or ids "0,1"; None: GPUs when present (solver_mode CPU: the CPU)
    amp: bool = True  # mixed precision, in amp_dtype (False: fp32 everywhere)
    amp_dtype: str = "auto"  # auto: GPU bf16 (fp16 + GradScaler without bf16), CPU fp32; bf16 / fp16: on any device
    channels_last: bool | None = None  # NHWC memory layout; None: on a GPU, not on the CPU
    cudnn_benchmark: bool = True  # GPU: let cuDNN pick the fastest conv kernels
    sync_bn: bool = False  # BatchNorm statistics over all processes (Caffe: per process)
    data_order: str = (
        "keys"  # TRAIN Data layers: Caffe's LMDB key order ("keys") or a permutation per epoch ("shuffle")
    )
    workers: int | None = None  # data loader processes per training process; None: from the CPU count
    sigint_effect: str = "stop"  # caffe: -sigint_effect (stop, snapshot or none)
    sighup_effect: str = "snapshot"  # caffe: -sighup_effect
    sigterm_effect: str = "stop"  # SIGTERM (a scheduler's preemption): like Caffe's -sigint_effect
    max_memory_gb: float | None = None  # refuse a net needing more (GB); None: the GPU's (or RAM's) size; 0: no check
    check: bool = False  # validate everything, then exit before training
