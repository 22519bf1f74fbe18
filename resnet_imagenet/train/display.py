"""Caffe's training log: number formats, output lines, the smoothed loss (tools/extra/parse_log.py reads them)."""

from __future__ import annotations

import logging
import math
import time

import torch

from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import to_text

log = logging.getLogger(__name__)


def g(x: float) -> str:
    """A number as C++ streams print it (6 significant digits), as in Caffe's logs."""
    return f"{x:.6g}"


def hms(seconds: float) -> str:
    """``H:MM:SS`` for an ETA; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def flat_outputs(net: CaffeNet, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, int]]:
    """Every output blob of ``net`` as one float vector (to reduce in one call), and each blob's element count."""
    counts = {n: out[n].numel() for n in net.output_names}
    return torch.cat([out[n].detach().float().reshape(-1) for n in net.output_names]), counts


def log_outputs(net: CaffeNet, vec: list[float], counts: dict[str, int], what: str) -> None:
    """Caffe's ``    Train net output #k: name = v (* w = w*v loss)`` lines, one per output element."""
    k = 0
    for name in net.output_names:
        w = net.loss_weights.get(name, 0.0)
        for _ in range(counts[name]):
            v = vec[k]
            extra = f" (* {g(w)} = {g(w * v)} loss)" if w else ""
            log.info("    %s net output #%d: %s = %s%s", what, k, name, g(v), extra)
            k += 1


def log_nets(sp: caffe_pb2.SolverParameter, net_params: list[caffe_pb2.NetParameter], test: bool) -> None:
    """caffe: Solver::InitTrainNet / InitTestNets' lines -- each net's source and resolved prototxt.

    ``net_params``: the TRAIN net, then the TEST nets (logged when ``test``: the process that tests).
    """
    if sp.HasField("net") or sp.HasField("train_net"):
        log.info("Creating training net from net file: %s", sp.net or sp.train_net)
    log.info("Initializing net from parameters: \n%s", to_text(net_params[0]))
    for i, np_ in enumerate(net_params[1:] if test else []):
        log.info("Creating test net (#%d) specified by the solver", i)
        log.info("Initializing net from parameters: \n%s", to_text(np_))


def log_setup(trainer) -> None:
    """What Caffe logs while a trainer sets up: the resolved solver, the nets, the devices, the starting point."""
    opts, procs, prec = trainer.opts, trainer.procs, trainer.prec
    log.info("Initializing solver from parameters: \n%s", to_text(trainer.sp))
    if procs.gpu_ids is None:
        log.info("Use CPU.")
    else:
        log.info("Using GPUs %s", ", ".join(str(i) for i in procs.gpu_ids))
        log.info("GPU %d: %s", procs.device.index, torch.cuda.get_device_name(procs.device))
    if procs.gpu_ids is not None or prec.amp_dtype is not None or prec.channels_last:
        log.info("%s", prec)
    batch = trainer.feeds.batch_size
    log.info("%d process(es), batch %d per process, random seed %d", procs.world_size, batch, trainer.seed)
    log_nets(trainer.sp, trainer.net_params, test=procs.rank == 0)
    if opts.sync_bn:
        log.info("BatchNorm statistics are synchronised across processes")
    if opts.weights:
        log.info("Finetuning from %s", opts.weights)
    if opts.snapshot:
        log.info("Restoring previous solver status from %s", opts.snapshot)


class SmoothedLoss:
    """caffe: Solver::UpdateSmoothedLoss -- the mean of the last average_loss losses (saved in snapshots)."""

    def __init__(self, average_loss: int):
        self.average_loss = average_loss
        self.losses: list[float] = []
        self.smoothed = 0.0
        self.start_iter = 0

    def update(self, loss: float, it: int) -> float:
        avg = self.average_loss
        if len(self.losses) < avg:
            self.losses.append(loss)
            self.smoothed = (self.smoothed * (len(self.losses) - 1) + loss) / len(self.losses)
        else:
            idx = (it - self.start_iter) % avg
            self.smoothed += (loss - self.losses[idx]) / avg
            self.losses[idx] = loss
        return self.smoothed

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "smoothed": self.smoothed, "start_iter": self.start_iter}

    def load_state_dict(self, d: dict) -> None:
        self.losses, self.smoothed, self.start_iter = list(d["losses"]), d["smoothed"], d["start_iter"]


class Display:
    """caffe: Solver::Step's display every ``every`` iterations: the rate, the smoothed loss, the TRAIN outputs.

    Ours after them: images per second and the ETA (``images`` per iteration over all processes).
    """

    def __init__(self, net: CaffeNet, every: int, max_iter: int, images: int):
        self.net, self.every, self.max_iter, self.images = net, every, max_iter, images
        self.start(0)

    def start(self, it: int) -> None:
        """Time the next display's rate from now and iteration ``it``."""
        self.since, self.since_iter = time.time(), it

    def due(self, it: int) -> bool:
        return bool(self.every) and it % self.every == 0

    def log(
        self, it: int, loss: float, outputs: list[float], counts: dict[str, int], data_wait: float | None = None
    ) -> None:
        """The display lines of iteration ``it`` (``outputs``: flat_outputs averaged over processes).

        ``data_wait``: seconds spent waiting for batches since the last display (step.DataWait), logged as
        the share of the time (the device's idle share due to the loader)."""
        lapse = time.time() - self.since
        per_s = (it - self.since_iter) / (lapse or 1)
        log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", it, g(per_s), g(lapse), self.every, g(loss))
        log_outputs(self.net, outputs, counts, "Train")
        if it > self.since_iter:
            eta = (self.max_iter - it) / per_s if per_s else float("inf")
            wait = f", data wait {100 * data_wait / (lapse or 1):.1f}%" if data_wait is not None else ""
            speed = per_s * self.images
            log.info("    Speed: %.1f images/s (%d per iteration), ETA %s%s", speed, self.images, hms(eta), wait)
        self.start(it)
