"""Caffe's ComputeUpdateValue for each solver type, on lists of tensors (one torch._foreach kernel per step).

Each rule takes the blobs of one (lr_mult, decay_mult) group after Normalize and Regularize, with
``local_rate = rate * lr_mult``, and applies ``w -= update`` (caffe: Net::Update). ``h`` and ``h2``
are the solver's history blobs; Caffe saves ``h`` of every blob, then ``h2`` of every blob
(history_[i] and history_[N + i]), which is the order a SolverState's ``history`` holds them in.

==========  ==================================================================================
SGD         h = momentum*h + lr*g;  w -= h                              (sgd_solver.cpp)
Nesterov    h' = momentum*h + lr*g;  w -= (1+momentum)*h' - momentum*h  (nesterov_solver.cpp)
AdaGrad     h += g^2;  w -= lr * g / (sqrt(h) + delta)                  (adagrad_solver.cpp)
RMSProp     h = rms_decay*h + (1-rms_decay)*g^2;  w -= lr * g / (sqrt(h) + delta)   (rmsprop_solver.cpp)
AdaDelta    h = m*h + (1-m)*g^2;  u = g * sqrt((h2 + delta) / (h + delta));
            h2 = m*h2 + (1-m)*u^2;  w -= lr * u        (m = momentum; adadelta_solver.cpp)
Adam        h = b1*h + (1-b1)*g;  h2 = b2*h2 + (1-b2)*g^2;
            w -= lr * sqrt(1-b2^t)/(1-b1^t) * h / (sqrt(h2) + delta),  t = it+1   (adam_solver.cpp)
==========  ==================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from resnet_imagenet.proto import caffe_pb2

Tensors = list[torch.Tensor]
Rule = Callable[[caffe_pb2.SolverParameter, Tensors, Tensors, Tensors, Tensors, float, int], None]


def sgd(sp, w: Tensors, g: Tensors, h: Tensors, h2: Tensors, lr: float, it: int) -> None:
    torch._foreach_mul_(h, sp.momentum)
    torch._foreach_add_(h, g, alpha=lr)
    torch._foreach_sub_(w, h)


def nesterov(sp, w: Tensors, g: Tensors, h: Tensors, h2: Tensors, lr: float, it: int) -> None:
    old = torch._foreach_mul(h, sp.momentum)  # momentum * h before the step, for the step back
    torch._foreach_mul_(h, sp.momentum)
    torch._foreach_add_(h, g, alpha=lr)
    update = torch._foreach_mul(h, 1.0 + sp.momentum)
    torch._foreach_sub_(update, old)
    torch._foreach_sub_(w, update)


def adagrad(sp, w: Tensors, g: Tensors, h: Tensors, h2: Tensors, lr: float, it: int) -> None:
    torch._foreach_addcmul_(h, g, g)
    denom = torch._foreach_sqrt(h)
    torch._foreach_add_(denom, sp.delta)
    torch._foreach_addcdiv_(w, g, denom, value=-lr)


def rmsprop(sp, w: Tensors, g: Tensors, h: Tensors, h2: Tensors, lr: float, it: int) -> None:
    torch._foreach_mul_(h, sp.rms_decay)
    torch._foreach_addcmul_(h, g, g, value=1.0 - sp.rms_decay)
    denom = torch._foreach_sqrt(h)
    torch._foreach_add_(denom, sp.delta)
    torch._foreach_addcdiv_(w, g, denom, value=-lr)


def adadelta(sp, w: Tensors, g: Tensors, h: Tensors, h2: Tensors, lr: float, it: int) -> None:
    m, delta = sp.momentum, sp.delta
    torch._foreach_mul_(h, m)
    torch._foreach_addcmul_(h, g, g, value=1.0 - m)
    # caffe: delta is added to both histories before the division, then the ratio's square root
    ratio = torch._foreach_add(h2, delta)
    torch._foreach_div_(ratio, torch._foreach_add(h, delta))
    torch._foreach_sqrt_(ratio)
    u = torch._foreach_mul(g, ratio)
    torch._foreach_mul_(h2, m)
    torch._foreach_addcmul_(h2, u, u, value=1.0 - m)
    torch._foreach_add_(w, u, alpha=-lr)  # caffe: the rate is applied last, after the history update


def adam(sp, w: Tensors, g: Tensors, h: Tensors, h2: Tensors, lr: float, it: int) -> None:
    b1, b2, t = sp.momentum, sp.momentum2, it + 1
    correction = math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    torch._foreach_mul_(h, b1)
    torch._foreach_add_(h, g, alpha=1.0 - b1)
    torch._foreach_mul_(h2, b2)
    torch._foreach_addcmul_(h2, g, g, value=1.0 - b2)
    denom = torch._foreach_sqrt(h2)
    torch._foreach_add_(denom, sp.delta)
    torch._foreach_addcdiv_(w, h, denom, value=-lr * correction)


RULES: dict[str, Rule] = {
    "SGD": sgd,
    "Nesterov": nesterov,
    "AdaGrad": adagrad,
    "RMSProp": rmsprop,
    "AdaDelta": adadelta,
    "Adam": adam,
}
# caffe: AdaDeltaPreSolve / AdamPreSolve push a second history blob per parameter
TWO_BLOBS = ("AdaDelta", "Adam")


def check_rule(sp: caffe_pb2.SolverParameter) -> None:
    """caffe: the solvers' constructor_sanity_check -- AdaGrad and RMSProp take no momentum; 0 <= rms_decay < 1."""
    if sp.type in ("AdaGrad", "RMSProp") and sp.momentum != 0:
        raise ValueError(f"Momentum cannot be used with {sp.type} (momentum: {sp.momentum:g})")
    if sp.type == "RMSProp" and not 0 <= sp.rms_decay < 1:
        raise ValueError(f"rms_decay should lie between 0 and 1 (got {sp.rms_decay:g})")
