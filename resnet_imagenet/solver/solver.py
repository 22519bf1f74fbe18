"""Caffe's solvers on torch tensors: SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam (lr: lr_policy.py).

The update follows Caffe's SGDSolver::ApplyUpdate order: clip the (summed) gradients by their global
L2 norm, then per blob divide by iter_size, add weight decay (L2: ``decay*w``; L1: ``decay*sign(w)``),
and compute the step with ``local_lr = rate*lr_mult`` and ``local_decay = weight_decay*decay_mult``
by the solver type's rule (the table in updates.py).

Blobs with lr_mult 0 are left alone (Caffe does not propagate to them: param_propagate_down is false).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.solver.lr_policy import check_lr_policy, learning_rate, multistep_count
from resnet_imagenet.solver.updates import RULES, TWO_BLOBS, check_rule

log = logging.getLogger(__name__)

SOLVER_TYPES = tuple(RULES)


def check_solver(sp: caffe_pb2.SolverParameter) -> None:
    """Raise ValueError for what Caffe would CHECK-fail on, before any work is done."""
    if sp.type not in SOLVER_TYPES:
        raise ValueError(f"solver type {sp.type!r} is not supported (supported: {', '.join(SOLVER_TYPES)})")
    check_rule(sp)
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
        # Adam's second moment, AdaDelta's update history; caffe: history_[N + i]
        self.history2 = [torch.zeros_like(x.param) for x in self.learnables] if sp.type in TWO_BLOBS else []
        # caffe: current_step_ of multistep, from (step, iteration) on: (0, 0) fresh, else a SolverState's
        self._multistep_from = (0, 0)
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
        rate = self.rate(it)
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

    def rate(self, it: int) -> float:
        """caffe: GetLearningRate at ``it``; multistep counts on from a restored current_step."""
        sp = self.sp
        if sp.lr_policy != "multistep" or self._multistep_from == (0, 0):
            return learning_rate(sp, it)
        step = multistep_count(list(sp.stepvalue), it, *self._multistep_from)
        return sp.base_lr * sp.gamma**step

    def current_step(self, it: int) -> int:
        """caffe: current_step_ after the GetLearningRate of iteration ``it - 1`` (what Snapshot at ``it`` saves)."""
        sp = self.sp
        if it <= 0:
            return self._multistep_from[0]
        if sp.lr_policy == "step":
            return (it - 1) // sp.stepsize
        if sp.lr_policy == "multistep":
            return multistep_count(list(sp.stepvalue), it - 1, *self._multistep_from)
        return 0

    def restore_schedule(self, current_step: int, it: int) -> None:
        """caffe: RestoreSolverState -- multistep goes on from ``current_step`` at ``it`` (step recomputes it)."""
        self._multistep_from = (int(current_step), int(it))

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
            hist2 = [self.history2[i] for i in idx] if self.history2 else []
            RULES[sp.type](sp, params, grads, [self.history[i] for i in idx], hist2, rate * lr_mult, it)

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

    def caffe_history(self) -> list[torch.Tensor]:
        """The history blobs in a SolverState's order: h of every blob, then h2 of every blob (caffe: history_)."""
        return [h.detach().cpu() for h in self.history + self.history2]

    def state_from_caffe(self, blobs: Sequence[torch.Tensor], where: str = "solverstate") -> dict:
        """A state_dict() from a SolverState's history blobs (Caffe's order), checked against this net.

        Legacy 4-D blobs (num/channels/height/width) of the right size are reshaped, as Caffe's FromProto does.
        """
        n, two = len(self.learnables), self.sp.type in TWO_BLOBS
        want = 2 * n if two else n
        if len(blobs) != want:
            per = "two per learnable blob" if two else "one per learnable blob"
            raise ValueError(
                f"{where}: {len(blobs)} history blobs, but solver type {self.sp.type} on this net has {want} ({per}); "
                "is it a state of another net or solver type?"
            )
        out = []
        for i, b in enumerate(blobs):
            mine = (self.history + self.history2)[i]
            if tuple(b.shape) != tuple(mine.shape) and b.numel() == mine.numel() and b.dim() == 4:
                b = b.reshape(mine.shape)
            out.append(b)
        state = {"type": self.sp.type, "history": out[:n], "history2": out[n:]}
        self.check_state_dict(state)
        return state


class _ScalerStep(torch.optim.Optimizer):
    """Lets torch's GradScaler unscale the solver's gradients and skip Caffe's update when they overflowed."""

    def __init__(self, solver: CaffeSolver):
        super().__init__([x.param for x in solver.learnables], {})
        self.solver = solver
        self.pending = (0, 0.0)  # (iteration, rate) of the update the scaler lets through

    def step(self, closure=None) -> None:
        self.solver._update(*self.pending)
