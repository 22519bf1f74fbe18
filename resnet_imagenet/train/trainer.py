"""The training loop: Caffe's Solver::Solve / Step on torch, for 1 or N processes (torchrun).

One iteration, as Caffe's Step: test (rank 0, every test_interval), iter_size forward/backward
passes whose gradients accumulate (averaged across processes), the smoothed loss and the display,
ApplyUpdate (resnet_imagenet.solver), ++iter, snapshot every ``snapshot`` iterations or on a signal.
SIGINT snapshots and stops, SIGHUP snapshots and goes on (Caffe's -sigint_effect / -sighup_effect
defaults); a NaN or inf loss stops with a message naming the iteration and keeps the last snapshot.
The log lines are Caffe's, so tools/extra/parse_log.py reads our logs. The trainer's state (the
solverstate's content) is the dict of its parts' state_dict()s; snapshot.py writes and reads the files.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from resnet_imagenet.proto.text import TEST, TRAIN
from resnet_imagenet.solver.solver import CaffeSolver
from resnet_imagenet.train import dist as D
from resnet_imagenet.train.display import Display, SmoothedLoss, flat_outputs, g, log_setup
from resnet_imagenet.train.guard import DivergenceGuard, TrainingDiverged
from resnet_imagenet.train.options import TrainOptions
from resnet_imagenet.train.resume import check_resume, load_rank_state, resume_weights
from resnet_imagenet.train.setup import (
    Feeds,
    build_feeds,
    build_nets,
    check_memory,
    learnables,
    load_solver,
    solver_nets,
)
from resnet_imagenet.train.signals import NONE, SNAPSHOT, STOP, Signals, launcher_pid
from resnet_imagenet.train.snapshot import (
    SnapshotError,
    load_solverstate,
    resolve_snapshot_prefix,
    rng_state,
    save_snapshot,
    snapshot_paths,
)
from resnet_imagenet.train.solverstate import SolverStateFile
from resnet_imagenet.train.step import DataWait, Precision, forward_backward, last_forward
from resnet_imagenet.train.testpass import test_all

log = logging.getLogger(__name__)


__all__ = ["Trainer", "TrainOptions", "TrainingDiverged", "load_rank_state", "train"]


class Trainer:
    """Builds the nets, feeds and solver from a solver prototxt (see TrainOptions), then ``solve()``."""

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        if opts.snapshot and opts.weights:
            raise ValueError("give --snapshot (resume) or --weights (fine-tune), not both")
        self.sp = sp = load_solver(opts.solver)
        self.prefix = resolve_snapshot_prefix(sp, opts.solver)
        gpu = opts.gpu if opts.gpu is not None or sp.solver_mode == sp.GPU else "cpu"
        self.procs = P = D.check_procs(gpu) if opts.check else D.init_procs(gpu)
        self.prec = Precision.of(P.device, opts)
        self.wait = DataWait()
        # Resume state first: its seed drives the data order.
        state = load_solverstate(opts.snapshot, sp.max_iter) if opts.snapshot else None
        self.seed = self._seed(state)
        torch.manual_seed(self.seed)  # caffe: Caffe::set_random_seed -- the same initial weights everywhere
        train_param, test_params = solver_nets(sp)
        self.net_params = [train_param] + test_params
        gpu = P.gpu_ids[P.local_rank] if P.gpu_ids else None
        check_memory([(train_param, TRAIN)] + [(t, TEST) for t in test_params], gpu, opts.max_memory_gb)
        self.net, self.test_nets = build_nets(
            train_param,
            test_params if P.rank == 0 else [],
            device=P.device,
            channels_last=self.prec.channels_last,
            weights=opts.weights,
            resume=resume_weights(state) if state is not None else None,
            sync_bn=opts.sync_bn,
        )
        self._build_feeds()
        self.solver = CaffeSolver(sp, learnables(self.net))
        if state is not None:  # a net/solverstate mismatch fails here, early
            check_resume(state, self.solver, sp)
        self._resume = state  # restored by solve(), as Caffe's Solve calls Restore
        self.model = self.net if opts.check else D.parallel(self.net, P)
        self.iter = 0
        self.loss = SmoothedLoss(sp.average_loss)
        self.guard = DivergenceGuard()
        self.display = Display(self.net, sp.display, sp.max_iter, self.feeds.batch_size * sp.iter_size * P.world_size)
        self.last_snapshot: str | None = opts.snapshot  # the last snapshot written or resumed from
        self.snapshot_iter = -1  # the iteration of the last snapshot written (or resumed from)
        self.early_exit = False

    # -- setup ---------------------------------------------------------------------------------

    def _seed(self, state: SolverStateFile | None) -> int:
        """The resumed run's seed, else random_seed; unset (-1), rank 0 draws one for every rank."""
        if state is not None and state.extra is not None:
            return state.extra["seed"]
        sp = self.sp
        seed = sp.random_seed if sp.random_seed >= 0 else int.from_bytes(os.urandom(4), "little") >> 1
        return seed if self.opts.check else D.broadcast_int(seed, self.procs)

    def _build_feeds(self) -> None:
        P, workers = self.procs, self.opts.workers
        if workers is None:
            workers = max(1, min(8, (os.cpu_count() or 2) // P.local_world_size - 1))
        kw = {"seed": self.seed, "workers": workers, "device": P.device, "channels_last": self.prec.channels_last}
        self.feeds: Feeds = build_feeds(
            self.net, TRAIN, rank=P.rank, world=P.world_size, order=self.opts.data_order, **kw
        )
        self.test_feeds: list[Feeds] = [build_feeds(t, TEST, rank=0, world=1, **kw) for t in self.test_nets]

    # -- state ---------------------------------------------------------------------------------

    def _rank_state(self) -> dict[str, Any]:
        """This rank's part of a snapshot: its random generators and its TRAIN feeds' positions."""
        return {"rng": rng_state(), "feeds": self.feeds.state_dict()}

    def state_dict(self, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        """The sidecar's content (what Caffe's SolverState has no field for): each part's own state_dict().

        ``per_rank`` holds every rank's _rank_state(), gathered on rank 0, which writes the snapshot.
        The solver's history and schedule go to the SolverState itself (snapshot()).
        """
        return {
            "seed": self.seed,
            "world_size": len(per_rank),
            "solver_type": self.sp.type,
            "rng": [x["rng"] for x in per_rank],
            "train_feeds": [x["feeds"] for x in per_rank],
            "test_feeds": [feeds.state_dict() for feeds in self.test_feeds],
            "smoothing": self.loss.state_dict(),
            "scaler": self.prec.scaler.state_dict() if self.prec.scaler is not None else {},
        }

    def load_state_dict(self, state: SolverStateFile) -> None:
        """caffe: Solver::Restore -- iter, history and schedule; with a sidecar also the rest, this rank's share
        through load_rank_state. Without one (Caffe's state) the data and random streams start as a fresh run's."""
        self.iter = state.iter
        self.solver.load_state_dict(state.solver)
        self.solver.restore_schedule(state.current_step, state.iter)
        self.snapshot_iter = self.iter
        extra = state.extra
        if extra is None:
            torch.manual_seed(self.seed + self.procs.rank)
            return
        self.loss.load_state_dict(extra["smoothing"])
        if self.prec.scaler is not None and extra.get("scaler"):
            self.prec.scaler.load_state_dict(extra["scaler"])
        for feeds, saved in zip(self.test_feeds, extra["test_feeds"]):  # rank 0 tests alone: always one process
            feeds.load_state_dict(saved)
        load_rank_state(extra, self.feeds, rank=self.procs.rank, world_size=self.procs.world_size)

    def snapshot(self) -> None:
        """caffe: Solver::Snapshot -- every rank gives its RNG and data position; rank 0 writes."""
        self.snapshot_iter = self.iter  # on every rank: solve() decides on it collectively
        per_rank = D.gather_objects(self._rank_state(), self.procs)
        error = None
        if self.procs.rank == 0:
            try:
                save_snapshot(
                    self.net,
                    self.prefix,
                    self.iter,
                    history=self.solver.caffe_history(),
                    current_step=self.solver.current_step(self.iter),
                    extra=self.state_dict(per_rank),
                )
            except Exception as e:  # anything: the other ranks must hear of it, not wait at the next collective
                error = e
        # every rank learns whether rank 0 wrote it, so all stop together instead of blocking
        if self._reduce(torch.tensor([float(error is not None)], device=self.procs.device))[0]:
            model_path, _ = snapshot_paths(self.prefix, self.iter)
            if error is None:
                raise SnapshotError(f"snapshot {model_path} failed on rank 0 (see its log); stopping")
            raise SnapshotError(
                f"snapshot {model_path} failed: {error}; stopping; last good snapshot: {self.last_snapshot or 'none'}"
            ) from error
        # every rank knows the path rank 0 wrote (the names are the iteration's), so any rank's message names it
        self.last_snapshot = str(snapshot_paths(self.prefix, self.iter)[1])

    # -- passes --------------------------------------------------------------------------------

    def _reduce(self, values: torch.Tensor) -> list[float]:
        """Sum over processes (one small all_reduce per iteration carries loss, outputs and signals)."""
        if self.procs.distributed:
            dist.all_reduce(values)
        return values.tolist()

    def _test_all(self) -> None:
        """Rank 0 scores every TEST net (testpass.test_all); a STOP signal interrupts."""
        test_all(self.sp, self.test_nets, self.test_feeds, it=self.iter, stopped=lambda: self.signals.peek() == STOP)

    def _update_loss(self, loss: float, capped: float, count: float) -> None:
        """caffe: UpdateSmoothedLoss; a NaN, inf or stuck loss stops training instead (guard.py, TrainingDiverged)."""
        self.guard.check(self.iter, loss, capped, count, self.last_snapshot, self.procs.rank)
        self.loss.update(loss, self.iter)

    def step(self) -> None:
        """Caffe's Step loop up to max_iter (see the module docstring)."""
        sp, P = self.sp, self.procs
        self.display.start(self.iter)
        self.wait.take()
        while self.iter < sp.max_iter:
            if sp.test_interval and self.iter % sp.test_interval == 0 and (self.iter > 0 or sp.test_initialization):
                if P.rank == 0:
                    self._test_all()
            display = self.display.due(self.iter)
            loss, out = forward_backward(self)
            pending = self.signals.take()
            parts = [loss, torch.tensor([pending == SNAPSHOT, pending == STOP], device=P.device)]
            if display:
                vec, counts = flat_outputs(self.net, out)
                parts.append(vec)
            red = self._reduce(torch.cat([p.float() for p in parts]))
            self._update_loss(red[0] / P.world_size, red[1], red[2])
            red = red[:1] + red[3:]  # [loss, snapshot, stop, outputs...]
            if display:
                outputs = [v / P.world_size for v in red[3:]]
                self.display.log(self.iter, self.loss.smoothed, outputs, counts, data_wait=self.wait.take())
            self.solver.apply_update(self.iter, self.prec.scaler, display=display)
            self.iter += 1
            action = (SNAPSHOT if red[1] > 0 else NONE) if red[2] == 0 else STOP
            # caffe: Solver::Step snapshots periodically or on a SNAPSHOT request; a STOP's snapshot
            # comes from Solve (snapshot_after_train), so it is written once
            if (sp.snapshot and self.iter % sp.snapshot == 0) or action == SNAPSHOT:
                self.snapshot()
            if action == STOP:
                self.early_exit = True
                break

    def _last_display(self) -> None:
        """caffe: Solve's extra TRAIN forward (step.last_forward) and its display line."""
        self.loss.update(self._reduce(last_forward(self))[0] / self.procs.world_size, self.iter)
        log.info("Iteration %d, loss = %s", self.iter, g(self.loss.smoothed))

    def solve(self) -> None:
        """caffe: Solver::Solve -- restore, Step to max_iter, snapshot at the end, a final display and test."""
        sp, P = self.sp, self.procs
        if self._resume is not None:
            state, self._resume = self._resume, None
            self.load_state_dict(state)
        else:
            # different random streams per process (dropout), the same data order everywhere
            torch.manual_seed(self.seed + P.rank)
        log_setup(self)
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", sp.lr_policy)
        opts = self.opts
        with Signals(opts.sigint_effect, opts.sighup_effect, opts.sigterm_effect, launcher_pid()) as self.signals:
            self.step()
            if sp.snapshot_after_train and self.snapshot_iter != self.iter:
                self.snapshot()
            if self.early_exit:
                log.info("Optimization stopped early.")
                return
            if self.display.due(self.iter):
                self._last_display()
            if sp.test_interval and self.iter % sp.test_interval == 0 and P.rank == 0:
                self._test_all()
        log.info("Optimization Done.")

    def close(self, clean: bool = True) -> None:
        """Stop the feeds; leave the process group (waiting for the others first after a ``clean`` run)."""
        for feeds in [self.feeds, *self.test_feeds]:
            feeds.close()
        if not self.opts.check:
            # Drop DDP (its reducer holds the process group) before the group goes, not at interpreter exit
            self.model = None
            gc.collect()
            D.close_procs(self.procs, clean)


def train(opts: TrainOptions) -> int:
    """Run ``resnet-imagenet train``. Returns 0; raises ValueError on bad input, TrainingDiverged on NaN,
    SnapshotError (on every rank) when a snapshot cannot be written."""
    trainer = Trainer(opts)
    clean = False
    try:
        if opts.check:
            log.info(
                "Check passed: solver, nets, data%s are usable", " and weights" if opts.weights or opts.snapshot else ""
            )
        else:
            trainer.solve()
        clean = True
    finally:
        trainer.close(clean)
    return 0
