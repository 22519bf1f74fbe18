"""Caffe's solvers on torch tensors: learning-rate policies and the SGD / Nesterov / Adam updates.

Learning-rate policies are pure functions of the iteration ``it`` (caffe: sgd_solver.cpp GetLearningRate):

============  ==========================================================================
fixed         base_lr
step          base_lr * gamma ^ floor(it / stepsize)
exp           base_lr * gamma ^ it
inv           base_lr * (1 + gamma * it) ^ (-power)
multistep     base_lr * gamma ^ (number of stepvalues passed, as Caffe's counter moves)
poly          base_lr * (1 - it / max_iter) ^ power
sigmoid       base_lr * 1 / (1 + exp(-gamma * (it - stepsize)))
============  ==========================================================================

The update follows Caffe's SGDSolver::ApplyUpdate order: clip the (summed) gradients by their global
L2 norm, then per blob divide by iter_size, add weight decay (L2: ``decay*w``; L1: ``decay*sign(w)``),
and compute the step with ``local_lr = rate*lr_mult`` and ``local_decay = weight_decay*decay_mult``:

- SGD:      ``v = momentum*v + local_lr*g;  w -= v``
- Nesterov: ``v' = momentum*v + local_lr*g;  w -= (1+momentum)*v' - momentum*v``
- Adam:     ``m = b1*m + (1-b1)*g;  s = b2*s + (1-b2)*g^2;``
  ``w -= local_lr * sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(s)+delta)`` with ``t = it+1``.

Blobs with lr_mult 0 are left alone (Caffe does not propagate to them: param_propagate_down is false).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from resnet_imagenet.proto import caffe_pb2

log = logging.getLogger(__name__)

SOLVER_TYPES = ("SGD", "Nesterov", "Adam")
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def multistep_count(stepvalues: Sequence[int], it: int) -> int:
    """How many steps Caffe's multistep counter has taken when GetLearningRate is called at ``it``.

    caffe: the counter moves by at most one per iteration, when ``it >= stepvalue[current_step]``;
    this replays that exactly (also for unsorted stepvalues) in O(len(stepvalues)).
    """
    step, earliest = 0, 0
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


def check_solver(sp: caffe_pb2.SolverParameter) -> None:
    """Raise ValueError for what Caffe would CHECK-fail on, before any work is done."""
    if sp.type not in SOLVER_TYPES:
        raise ValueError(f"solver type {sp.type!r} is not supported (supported: {', '.join(SOLVER_TYPES)})")
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
    if sp.regularization_type not in ("L1", "L2"):
        raise ValueError(f"unknown regularization_type {sp.regularization_type!r} (L1 or L2)")
    if sp.iter_size < 1:
        raise ValueError(f"iter_size must be >= 1, got {sp.iter_size}")
    if sp.average_loss < 1:
        raise ValueError(f"average_loss must be >= 1, got {sp.average_loss}")


@dataclass
class Learnable:
    """One learnable blob and its ParamSpec multipliers."""

    param: torch.Tensor
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    name: str = ""


class CaffeSolver:
    """Holds the history blobs of one of Caffe's solvers and applies its update to ``param.grad``.

    ``apply_update(it)`` expects each blob's ``.grad`` to hold the gradient summed over the
    iter_size micro-batches (already averaged over processes); ``None`` means zero.
    """

    def __init__(self, sp: caffe_pb2.SolverParameter, learnables: Sequence[Learnable]):
        check_solver(sp)
        self.sp = sp
        self.learnables = list(learnables)
        self.history = [torch.zeros_like(x.param) for x in self.learnables]
        # Adam's second moment; caffe: AdamSolver keeps it in history_[N + i].
        self.history2 = [torch.zeros_like(x.param) for x in self.learnables] if sp.type == "Adam" else []
        # Blobs grouped by (lr_mult, decay_mult) so each group is one set of _foreach kernels.
        groups: dict[tuple[float, float], list[int]] = {}
        for i, x in enumerate(self.learnables):
            if x.lr_mult != 0:
                groups.setdefault((x.lr_mult, x.decay_mult), []).append(i)
        self._groups = groups
        self._scaler_step: _ScalerStep | None = None

    # -- the update ----------------------------------------------------------------------------

    def _grads(self, idx: list[int]) -> list[torch.Tensor]:
        out = []
        for i in idx:
            p = self.learnables[i].param
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
        return out

    @torch.no_grad()
    def clip_gradients(self) -> float:
        """caffe: ClipGradients -- scale all diffs by clip/norm when their global L2 norm exceeds clip."""
        clip = self.sp.clip_gradients
        if clip < 0:
            return 1.0
        grads = [g for idx in self._groups.values() for g in self._grads(idx)]
        if not grads:
            return 1.0
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        if norm <= clip:
            return 1.0
        scale = clip / norm
        log.info(
            "Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
            f"{norm:.6g}",
            f"{clip:.6g}",
            f"{scale:.6g}",
        )
        torch._foreach_mul_(grads, scale)
        return scale

    def apply_update(self, it: int, scaler: torch.amp.GradScaler | None = None, display: bool = False) -> float:
        """One Caffe ApplyUpdate at iteration ``it``: clip, normalize, regularize, step. Returns the rate.

        With an fp16 ``scaler`` the gradients are unscaled first and the update is skipped when they
        overflowed (the scaler then shrinks its scale). ``display`` logs Caffe's ``Iteration N, lr = X``.
        """
        rate = learning_rate(self.sp, it)
        if display:  # caffe: SGDSolver::ApplyUpdate logs the rate before clipping
            log.info("Iteration %d, lr = %s", it, f"{rate:.6g}")
        if scaler is None:
            self._update(it, rate)
            return rate
        if self._scaler_step is None:
            self._scaler_step = _ScalerStep(self)
        self._scaler_step.pending = (it, rate)
        scaler.unscale_(self._scaler_step)
        scaler.step(self._scaler_step)
        scaler.update()
        return rate

    @torch.no_grad()
    def _update(self, it: int, rate: float) -> None:
        sp = self.sp
        self.clip_gradients()
        for (lr_mult, decay_mult), idx in self._groups.items():
            params = [self.learnables[i].param for i in idx]
            grads = self._grads(idx)
            if sp.iter_size != 1:  # caffe: Normalize
                torch._foreach_mul_(grads, 1.0 / sp.iter_size)
            local_decay = sp.weight_decay * decay_mult
            if local_decay:  # caffe: Regularize
                if sp.regularization_type == "L2":
                    torch._foreach_add_(grads, params, alpha=local_decay)
                else:
                    torch._foreach_add_(grads, torch._foreach_sign(params), alpha=local_decay)
            local_rate = rate * lr_mult
            hist = [self.history[i] for i in idx]
            if sp.type == "SGD":
                torch._foreach_mul_(hist, sp.momentum)
                torch._foreach_add_(hist, grads, alpha=local_rate)
                torch._foreach_sub_(params, hist)
            elif sp.type == "Nesterov":
                old = torch._foreach_mul(hist, sp.momentum)  # momentum * v_old, kept for the step back
                torch._foreach_mul_(hist, sp.momentum)
                torch._foreach_add_(hist, grads, alpha=local_rate)
                update = torch._foreach_mul(hist, 1.0 + sp.momentum)
                torch._foreach_sub_(update, old)
                torch._foreach_sub_(params, update)
            else:  # Adam
                b1, b2, t = sp.momentum, sp.momentum2, it + 1
                correction = math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
                hist2 = [self.history2[i] for i in idx]
                torch._foreach_mul_(hist, b1)
                torch._foreach_add_(hist, grads, alpha=1.0 - b1)
                torch._foreach_mul_(hist2, b2)
                torch._foreach_addcmul_(hist2, grads, grads, value=1.0 - b2)
                denom = torch._foreach_sqrt(hist2)
                torch._foreach_add_(denom, sp.delta)
                torch._foreach_addcdiv_(params, hist, denom, value=-local_rate * correction)

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """History blobs on the CPU, plus the solver type (to refuse a mismatched resume)."""
        return {
            "type": self.sp.type,
            "history": [h.detach().cpu().clone() for h in self.history],
            "history2": [h.detach().cpu().clone() for h in self.history2],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["type"] != self.sp.type:
            raise ValueError(f"solverstate is for solver type {state['type']!r}, the solver says {self.sp.type!r}")
        for mine, theirs, what in (
            (self.history, state["history"], "history"),
            (self.history2, state["history2"], "history2"),
        ):
            if len(mine) != len(theirs):
                raise ValueError(f"solverstate has {len(theirs)} {what} blobs, the net has {len(mine)} learnable blobs")
            for i, (h, s) in enumerate(zip(mine, theirs)):
                if tuple(h.shape) != tuple(s.shape):
                    name = self.learnables[i].name or f"#{i}"
                    raise ValueError(
                        f"solverstate {what} blob {name} has shape {tuple(s.shape)}, the net {tuple(h.shape)}"
                    )
                h.copy_(s)


class _ScalerStep(torch.optim.Optimizer):
    """Lets torch's GradScaler unscale the solver's gradients and skip Caffe's update when they overflowed."""

    def __init__(self, solver: CaffeSolver):
        super().__init__([x.param for x in solver.learnables], {})
        self.solver = solver
        self.pending = (0, 0.0)  # (iteration, rate) of the update the scaler lets through

    def step(self, closure=None) -> None:
        self.solver._update(*self.pending)
