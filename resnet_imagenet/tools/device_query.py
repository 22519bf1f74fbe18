"""``device_query``: Caffe's ``caffe device_query`` -- the properties of each GPU, or that there is none.

caffe: tools/caffe.cpp device_query() and Caffe::DeviceQuery print one ``Name: value`` line per
cudaDeviceProp field; here the fields torch.cuda.get_device_properties exposes, under Caffe's line names.
Caffe needs ``-gpu``; here every visible GPU is listed by default.
"""

from __future__ import annotations

import argparse

from resnet_imagenet.tools import add_command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "device_query")
    p.add_argument("--gpu", default="all", metavar="GPUS", help="GPU ids like 0,1 or all (default: all)")
    p.set_defaults(func=run)


def _ids(gpu: str, n: int) -> list[int]:
    """The GPU ids ``gpu`` names (``all``: every one of the ``n`` visible)."""
    if gpu.strip() == "all":
        return list(range(n))
    try:
        ids = [int(x) for x in gpu.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--gpu {gpu!r}: expected all or GPU ids like 0,1") from None
    for i in ids:
        if not 0 <= i < n:
            raise ValueError(f"GPU {i} does not exist ({n} GPU{'s' if n != 1 else ''} visible)")
    return ids


def device_lines(i: int) -> list[str]:
    """Caffe's device_query lines of GPU ``i``."""
    import torch

    p = torch.cuda.get_device_properties(i)
    lines = [
        f"Device id:                     {i}",
        f"Major revision number:         {p.major}",
        f"Minor revision number:         {p.minor}",
        f"Name:                          {p.name}",
        f"Total global memory:           {p.total_memory}",
        f"Number of multiprocessors:     {p.multi_processor_count}",
    ]
    for label, attr in (
        ("Warp size", "warp_size"),
        ("Maximum threads per multiprocessor", "max_threads_per_multi_processor"),
        ("Total shared memory per block", "shared_memory_per_block"),
        ("Total registers per multiprocessor", "regs_per_multiprocessor"),
        ("L2 cache size", "L2_cache_size"),
    ):
        if hasattr(p, attr):  # newer torch versions expose more of cudaDeviceProp
            lines.append(f"{label + ':':<31}{getattr(p, attr)}")
    return lines


def run(args: argparse.Namespace) -> int:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        print("No GPU found: CUDA is not available here (train, test and time run on the CPU)")
        return 0
    for k, i in enumerate(_ids(args.gpu, n)):
        if k:
            print()
        print(f"Querying GPU {i}")
        print("\n".join(device_lines(i)))
    return 0
