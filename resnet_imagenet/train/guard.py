"""The divergence guard: stop training on a loss that is not finite, or that is stuck at SoftmaxWithLoss's cap.

Caffe caps each item's loss at -log(FLT_MIN) = 87.3365 (softmax_loss_layer.cpp), so a net whose logits
explode but stay finite never gives a NaN: its loss sits at the cap. "Stuck" is defined here as: in
STUCK_ITERS consecutive iterations, at least STUCK_FRACTION of the (non-ignored) items of every
SoftmaxWithLoss of the TRAIN net, summed over all processes and iter_size passes, were at the cap (their
true-class probability below FLT_MIN, a logit gap over 87). A healthy net, even an over-confident one,
has almost no item there; a freshly initialised one none; a diverged one nearly all (all but the items
its exploded logits happen to get right, 1/num_output of them).
"""

from __future__ import annotations

import logging
import math

import torch

from resnet_imagenet.net.layers.loss import SoftmaxWithLoss
from resnet_imagenet.train.display import g

log = logging.getLogger(__name__)

STUCK_ITERS = 10  # consecutive iterations
STUCK_FRACTION = 0.5  # of the loss items at the cap
CAP = SoftmaxWithLoss.CAP


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf, or stuck at the cap; the message names the iteration and the last good snapshot."""


def capped_counts(net: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """[items at the cap, items] of the last forward of every SoftmaxWithLoss in ``net``."""
    out = torch.zeros(2, device=device)
    for m in net.modules():
        if isinstance(m, SoftmaxWithLoss) and m.count is not None:
            out += torch.stack([m.capped, m.count]).to(out)
    return out


class DivergenceGuard:
    """Reads each iteration's (reduced) loss and cap counts; raises TrainingDiverged on every rank alike."""

    def __init__(self, iters: int = STUCK_ITERS, fraction: float = STUCK_FRACTION):
        self.iters, self.fraction = iters, fraction
        self.streak = 0

    def check(self, it: int, loss: float, capped: float, count: float, last_snapshot: str | None, rank: int) -> None:
        """``loss``: the iteration's mean loss; ``capped`` / ``count``: summed over passes and processes."""
        why = None
        if not math.isfinite(loss):
            why = "the loss is not finite"
        else:
            self.streak = self.streak + 1 if count > 0 and capped >= self.fraction * count else 0
            if self.streak >= self.iters:
                why = (
                    f"at least {self.fraction:.0%} of the loss items at the cap -log(FLT_MIN) = {g(CAP)} "
                    f"for {self.iters} iterations: the logits diverged"
                )
        if why is None:
            return
        msg = f"Iteration {it}, loss = {g(loss)}: {why}, stopping; last good snapshot: {last_snapshot or 'none'}"
        if rank == 0:
            log.error(msg)
        raise TrainingDiverged(msg)
