"""Caffe's solvers on torch tensors: the SGD / Nesterov / Adam updates (learning rates: lr_policy.py).

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
from resnet_imagenet.solver.lr_policy import check_lr_policy, learning_rate

log = logging.getLogger(__name__)

SOLVER_TYPES = ("SGD", "Nesterov", "Adam")


def check_solver(sp: caffe_pb2.SolverParameter) -> None:
    """Raise ValueError for what Caffe would CHECK-fail on, before any work is done."""
    if sp.type not in SOLVER_TYPES:
        raise ValueError(f"solver type {sp.type!r} is not supported (supported: {', '.join(SOLVER_TYPES)})")
    check_lr_policy(sp)
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

    def check_state_dict(self, state: dict) -> None:
        """Raise ValueError when ``state`` (a state_dict()) is for another solver type or other blobs."""
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

    def load_state_dict(self, state: dict) -> None:
        """The history blobs of ``state`` (checked by check_state_dict first)."""
        self.check_state_dict(state)
        for mine, theirs in ((self.history, state["history"]), (self.history2, state["history2"])):
            for h, s in zip(mine, theirs):
                h.copy_(s)


class _ScalerStep(torch.optim.Optimizer):
    """Lets torch's GradScaler unscale the solver's gradients and skip Caffe's update when they overflowed."""

    def __init__(self, solver: CaffeSolver):
        super().__init__([x.param for x in solver.learnables], {})
        self.solver = solver
        self.pending = (0, 0.0)  # (iteration, rate) of the update the scaler lets through

    def step(self, closure=None) -> None:
        self.solver._update(*self.pending)
