"""Caffe's learning-rate policies as pure functions of the iteration ``it`` (caffe: sgd_solver.cpp GetLearningRate):

============  ==========================================================================
fixed         base_lr
step          base_lr * gamma ^ floor(it / stepsize)
exp           base_lr * gamma ^ it
inv           base_lr * (1 + gamma * it) ^ (-power)
multistep     base_lr * gamma ^ (number of stepvalues passed, as Caffe's counter moves)
poly          base_lr * (1 - it / max_iter) ^ power
sigmoid       base_lr * 1 / (1 + exp(-gamma * (it - stepsize)))
============  ==========================================================================

A resume therefore needs only ``iter``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from resnet_imagenet.proto import caffe_pb2

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def multistep_count(stepvalues: Sequence[int], it: int, step: int = 0, earliest: int = 0) -> int:
    """How many steps Caffe's multistep counter has taken when GetLearningRate is called at ``it``.

    caffe: the counter moves by at most one per iteration, when ``it >= stepvalue[current_step]``;
    this replays that exactly (also for unsorted stepvalues) in O(len(stepvalues)). ``step`` and
    ``earliest`` start the replay elsewhere: a SolverState's current_step, restored at iteration ``earliest``.
    """
    while step < len(stepvalues):
        crossed = max(earliest, stepvalues[step])
        if crossed > it:
            break
        step += 1
        earliest = crossed + 1
    return step


def learning_rate(sp: caffe_pb2.SolverParameter, it: int) -> float:
    """Caffe's learning rate at iteration ``it`` for the solver's lr_policy (see the module table)."""
    policy, base = sp.lr_policy, sp.base_lr
    if policy == "fixed":
        return base
    if policy == "step":
        return base * sp.gamma ** (it // sp.stepsize)
    if policy == "exp":
        return base * sp.gamma**it
    if policy == "inv":
        return base * (1.0 + sp.gamma * it) ** (-sp.power)
    if policy == "multistep":
        return base * sp.gamma ** multistep_count(list(sp.stepvalue), it)
    if policy == "poly":
        return base * (1.0 - it / sp.max_iter) ** sp.power
    if policy == "sigmoid":
        z = -sp.gamma * (it - sp.stepsize)
        # caffe computes exp in floating point: a huge z gives inf and a rate of 0, not an overflow error
        return base / (1.0 + math.exp(z)) if z < 700 else 0.0
    raise ValueError(f"unknown lr_policy {policy!r} (one of {', '.join(LR_POLICIES)})")


def check_lr_policy(sp: caffe_pb2.SolverParameter) -> None:
    """Raise ValueError for an lr_policy Caffe would CHECK-fail on (unknown, or missing its parameters)."""
    if not sp.HasField("lr_policy"):
        raise ValueError("solver has no lr_policy (one of " + ", ".join(LR_POLICIES) + ")")
    if sp.lr_policy not in LR_POLICIES:
        raise ValueError(f"unknown lr_policy {sp.lr_policy!r} (one of {', '.join(LR_POLICIES)})")
    if sp.lr_policy == "step" and sp.stepsize <= 0:
        raise ValueError(f"lr_policy {sp.lr_policy!r} needs stepsize > 0")
    # sigmoid decays only with a negative gamma, so it is not checked here (neither does Caffe)
    if sp.lr_policy in ("step", "exp", "inv", "multistep") and sp.gamma < 0:
        raise ValueError(f"lr_policy {sp.lr_policy!r} needs gamma >= 0")
    if sp.lr_policy == "poly" and sp.max_iter <= 0:
        raise ValueError("lr_policy 'poly' needs max_iter > 0")
