"""Caffe's training log: output lines, the smoothed loss, the test pass (tools/extra/parse_log.py reads them)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.train.setup import Feeds, net_inputs

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


def run_test(
    net: CaffeNet, feeds: Feeds, test_iter: int, *, it: int, index: int, compute_loss: bool,
    stopped: Callable[[], bool],
) -> None:  # fmt: skip
    """caffe: Solver::Test -- the mean of every output over test_iter batches of TEST net #index, logged."""
    log.info("Iteration %d, Testing net (#%d)", it, index)
    scores, counts, loss = None, {}, 0.0
    # fp32 even under AMP: bf16 logits tie often, and Caffe's Accuracy counts ties against the label
    with torch.no_grad():
        for _ in range(test_iter):
            if stopped():
                log.info("Test interrupted.")
                return
            out = net(**net_inputs(feeds))
            vec, counts = flat_outputs(net, out)
            scores = vec if scores is None else scores + vec
            if compute_loss:
                loss += float(net.loss(out))
    if compute_loss:
        log.info("Test loss: %s", g(loss / test_iter))
    if scores is not None:
        log_outputs(net, (scores / test_iter).tolist(), counts, "Test")
