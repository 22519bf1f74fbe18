"""Processes and devices for training: one code path for 1 or N processes launched by torchrun.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE; without them we are one process.
The backend is gloo on CPU and nccl on GPU (the precision of a step: step.py). Also
Caffe-BatchNorm synchronised across processes (``--sync-bn``): batch statistics summed over all
processes with an autograd-aware all_reduce.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from resnet_imagenet.net import layers as L
from resnet_imagenet.train.heartbeat import Heartbeat

log = logging.getLogger(__name__)


@dataclass
class Procs:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    gpu_ids: list[int] | None = None  # the CUDA ids of this machine's processes (parse_gpus); None: CPU
    heartbeat: Heartbeat | None = None  # the peer watchdog of a multi-process run (heartbeat.py)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_procs() -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) from torchrun's environment."""
    e = os.environ
    world = int(e.get("WORLD_SIZE", 1))
    return int(e.get("RANK", 0)), int(e.get("LOCAL_RANK", 0)), world, int(e.get("LOCAL_WORLD_SIZE", world))


def parse_gpus(gpu: str | None, local_world_size: int = 1) -> list[int] | None:
    """``--gpu``: None (GPUs if any, else CPU), ``cpu`` / ``cpu:N``, ``all``, or a comma list of ids.

    Returns the CUDA ids this machine's processes use (one each), or None for CPU. A GPU id that does
    not exist, or a count that does not match the number of processes here, is a ValueError.
    """
    n = torch.cuda.device_count()
    if gpu is None:
        if n == 0:
            return None
        gpu = "all" if local_world_size > 1 else "0"
    gpu = gpu.strip()
    if gpu == "cpu" or gpu.startswith("cpu:"):
        return None
    if gpu == "all":
        if n == 0:
            raise ValueError("--gpu all: no GPU is visible: use cpu or cpu:N")
        ids = list(range(n))
    else:
        try:
            ids = [int(x) for x in gpu.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--gpu {gpu!r}: expected cpu, cpu:N, all or GPU ids like 0,1,2,3") from None
        for i in ids:
            if not 0 <= i < n:
                use = "cpu or cpu:N" if n == 0 else f"ids 0..{n - 1}, all, cpu or cpu:N"
                raise ValueError(f"GPU {i} does not exist ({n} GPU{'s' if n != 1 else ''} visible): use {use}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"--gpu {gpu}: a GPU is listed twice")
    if len(ids) != local_world_size:
        raise ValueError(
            f"--gpu {gpu}: {len(ids)} GPUs for {local_world_size} process(es) on this machine; "
            f"launch one process per GPU (./train.sh {gpu} ... or torchrun --nproc_per_node {len(ids)})"
        )
    return ids


def init_procs(gpu: str | None) -> Procs:
    """Pick this process's device and join the process group (gloo on CPU, nccl on GPU)."""
    rank, local_rank, world, local_world = env_procs()
    ids = parse_gpus(gpu, local_world)
    if ids is None:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", ids[local_rank])
        torch.cuda.set_device(device)
    procs = Procs(rank, local_rank, world, local_world, device, ids)
    if procs.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=pg_timeout(), **kw)
        procs.heartbeat = Heartbeat.connect(rank, world)
        if procs.heartbeat is not None:
            procs.heartbeat.start()
    return procs


PG_TIMEOUT_ENV, PG_TIMEOUT_S = "RESNET_IMAGENET_PG_TIMEOUT", 1800


def pg_timeout() -> datetime.timedelta:
    """The process-group timeout: RESNET_IMAGENET_PG_TIMEOUT seconds (default 30 min; the older
    RESNET_IMAGENET_DIST_TIMEOUT_MIN in minutes still counts). Rank 0 tests alone (as Caffe's root solver)
    while the others wait in a collective, so it must outlast a TEST pass; a frozen peer is caught sooner,
    by the heartbeats (RESNET_IMAGENET_PEER_TIMEOUT, heartbeat.py)."""
    e = os.environ
    if PG_TIMEOUT_ENV not in e and "RESNET_IMAGENET_DIST_TIMEOUT_MIN" in e:
        return datetime.timedelta(minutes=float(e["RESNET_IMAGENET_DIST_TIMEOUT_MIN"]))
    return datetime.timedelta(seconds=float(e.get(PG_TIMEOUT_ENV, PG_TIMEOUT_S)))


def check_procs(gpu: str | None) -> Procs:
    """The Procs of ``train --check``: --gpu validated for this machine's processes, no group joined, CPU."""
    rank, _, world, local_world = env_procs()
    return Procs(rank, 0, world, local_world, torch.device("cpu"), parse_gpus(gpu, local_world))


def parallel(net: torch.nn.Module, procs: Procs) -> torch.nn.Module:
    """``net`` as the training loop calls it: in DistributedDataParallel when there are several processes."""
    if not procs.distributed:
        return net
    kw = {"device_ids": [procs.device]} if procs.device.type == "cuda" else {}
    # Per-process BatchNorm statistics, as Caffe's P2PSync: buffers are not broadcast.
    with warnings.catch_warnings():  # torch 2.14 deprecates broadcast_buffers but has no rank-local successor
        warnings.filterwarnings("ignore", ".*broadcast_buffers", FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(
            net, broadcast_buffers=False, gradient_as_bucket_view=True, **kw
        )


def close_procs(procs: Procs, clean: bool = True) -> None:
    """Leave the process group; after a clean run wait for the others first (not after an error: they may be gone)."""
    if procs.distributed and dist.is_initialized():
        if clean:
            dist.barrier()  # no process leaves while rank 0 still tests or snapshots
        if procs.heartbeat is not None:
            procs.heartbeat.stop()
            procs.heartbeat = None
        dist.destroy_process_group()


def broadcast_int(value: int, procs: Procs) -> int:
    """Rank 0's ``value`` on every rank."""
    if not procs.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=procs.device)
    dist.broadcast(t, 0)
    return int(t.item())


def gather_objects(obj, procs: Procs) -> list:
    """Every rank's ``obj`` (a small picklable state), in rank order, on every rank."""
    if not procs.distributed:
        return [obj]
    out = [None] * procs.world_size
    dist.all_gather_object(out, obj)
    return out


class SyncCaffeBatchNorm(L.BatchNorm):
    """Caffe's BatchNorm with the batch statistics of all processes (same blobs, same moving averages)."""

    def forward(self, x, weight=None, bias=None):
        if self.global_stats() or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x, weight, bias)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.full((1,), xf.numel() // c, dtype=torch.float32, device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        view = (1, c) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(view)) * torch.rsqrt(var.view(view) + self.eps)
        if weight is not None:
            y = y * weight.float().view(view)
        if bias is not None:
            y = y + bias.float().view(view)
        with torch.no_grad():
            # caffe: blobs = batch stat + maf * blobs, the variance unbiased by m / (m - 1)
            self.scale_factor.mul_(self.maf).add_(1.0)
            self.mean.mul_(self.maf).add_(mean.detach())
            self.variance.mul_(self.maf).add_(var.detach() * (n / (n - 1).clamp_min(1)))
        return y.to(x.dtype) if x.dtype != torch.float32 else y


def convert_sync_batchnorm(net: torch.nn.Module) -> int:
    """Turn every Caffe BatchNorm of ``net`` into SyncCaffeBatchNorm in place; returns how many."""
    n = 0
    for m in net.modules():
        if type(m) is L.BatchNorm:
            m.__class__ = SyncCaffeBatchNorm
            n += 1
    return n
