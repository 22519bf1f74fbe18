"""The training loop: Caffe's Solver::Solve / Step on torch, for 1 or N processes (torchrun).

One iteration, as Caffe's Step: test (rank 0, every test_interval), iter_size forward/backward
passes whose gradients accumulate (averaged across processes), the smoothed loss and the display,
ApplyUpdate (resnet_imagenet.solver), ++iter, snapshot every ``snapshot`` iterations or on a signal.
SIGINT snapshots and stops, SIGHUP snapshots and goes on (Caffe's -sigint_effect / -sighup_effect
defaults); a NaN or inf loss stops with a message naming the iteration and keeps the last snapshot.
The log lines are Caffe's, so tools/extra/parse_log.py reads our logs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import TEST, TRAIN, read_solver, to_text
from resnet_imagenet.solver.solver import CaffeSolver, check_solver
from resnet_imagenet.train import dist as D
from resnet_imagenet.train.display import SmoothedLoss, flat_outputs, g, hms, log_outputs, run_test
from resnet_imagenet.train.setup import Feeds, build_feeds, learnables, net_inputs, share_weights, solver_nets
from resnet_imagenet.train.signals import NONE, SNAPSHOT, STOP, Signals
from resnet_imagenet.train.snapshot import (
    SnapshotError,
    load_solverstate,
    local_state,
    resolve_snapshot_prefix,
    restore,
    save_snapshot,
    snapshot_paths,
    trainer_state,
)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the iteration and the last good snapshot."""


@dataclass
class TrainOptions:
    solver: str
    snapshot: str | None = None  # a .solverstate to resume from
    weights: str | None = None  # .caffemodel(s) to fine-tune from, comma separated
    gpu: str | None = None  # cpu, cpu:N, all, or ids "0,1"; None: GPUs when present
    amp: bool = True
    channels_last: bool = True
    cudnn_benchmark: bool = True
    sync_bn: bool = False
    workers: int | None = None
    sigint_effect: str = "stop"
    sighup_effect: str = "snapshot"
    check: bool = False  # validate everything, then exit before training


class Trainer:
    """Builds the nets, feeds and solver from a solver prototxt (see TrainOptions), then ``solve()``."""

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        if opts.snapshot and opts.weights:
            raise ValueError("give --snapshot (resume) or --weights (fine-tune), not both")
        sp = read_solver(opts.solver)
        check_solver(sp)
        if sp.snapshot_format != caffe_pb2.SolverParameter.BINARYPROTO:
            raise ValueError("snapshot_format HDF5 is not supported; snapshots are BINARYPROTO")
        if sp.max_iter <= 0:
            raise ValueError(f"{opts.solver}: max_iter must be > 0")
        self.sp = sp
        self.prefix = resolve_snapshot_prefix(sp, opts.solver)
        gpu = opts.gpu if opts.gpu is not None or sp.solver_mode == sp.GPU else "cpu"
        if opts.check:  # validate --gpu without joining a process group
            rank, _, world, local_world = D.env_procs()
            self.procs = D.Procs(rank, 0, world, local_world, torch.device("cpu"), D.parse_gpus(gpu, local_world))
        else:
            self.procs = D.init_procs(gpu)
        P, dev = self.procs, self.procs.device
        self.amp_dtype = None
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = opts.cudnn_benchmark
            if opts.amp:
                self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.channels_last = opts.channels_last and dev.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        # Resume state first: its seed drives the data order.
        self.state = None
        if opts.snapshot:
            self.state, self.resume_model = load_solverstate(opts.snapshot)
        seed = sp.random_seed if sp.random_seed >= 0 else int.from_bytes(os.urandom(4), "little") >> 1
        self.seed = self.state["seed"] if self.state else D.broadcast_int(seed, P) if not opts.check else seed
        torch.manual_seed(self.seed)  # caffe: Caffe::set_random_seed -- the same initial weights everywhere
        train_param, test_params = solver_nets(sp)
        self.net_params = [train_param] + test_params
        self.net = CaffeNet(train_param, TRAIN)
        if not self.net.loss_weights:
            raise ValueError("the TRAIN net has no loss (no *Loss layer or loss_weight)")
        self.test_nets: list[CaffeNet] = []
        if P.rank == 0:
            for tp in test_params:
                self.test_nets.append(CaffeNet(tp, TEST))
        if opts.weights:
            self.net.load_caffemodel(opts.weights)
        if self.state:
            self.net.load_caffemodel(self.resume_model)
        if opts.sync_bn:
            D.convert_sync_batchnorm(self.net)
        self.net.to(dev, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        for t in self.test_nets:
            share_weights(t, self.net)
            if opts.weights:  # caffe: -weights reaches the test nets' own layers too
                t.load_caffemodel(opts.weights)
            t.to(dev).eval()  # caffe: TEST phase -- BatchNorm uses the global statistics
        workers = opts.workers
        if workers is None:
            workers = max(1, min(8, (os.cpu_count() or 2) // P.local_world_size - 1))
        kw = {"seed": self.seed, "workers": workers, "device": dev, "channels_last": self.channels_last}
        self.feeds: Feeds = build_feeds(self.net, TRAIN, rank=P.rank, world=P.world_size, **kw)
        self.test_feeds: list[Feeds] = [build_feeds(t, TEST, rank=0, world=1, **kw) for t in self.test_nets]
        self.solver = CaffeSolver(sp, learnables(self.net))
        if self.state:
            self.solver.load_state_dict(self.state["solver"])  # a net/solverstate mismatch fails here, early
        self.model: torch.nn.Module = self.net
        if P.distributed and not opts.check:
            kw = {"device_ids": [dev]} if dev.type == "cuda" else {}
            # Per-process BatchNorm statistics, as Caffe's P2PSync: buffers are not broadcast.
            with warnings.catch_warnings():  # torch 2.14 deprecates broadcast_buffers but has no rank-local successor
                warnings.filterwarnings("ignore", ".*broadcast_buffers", FutureWarning)
                self.model = torch.nn.parallel.DistributedDataParallel(
                    self.net, broadcast_buffers=False, gradient_as_bucket_view=True, **kw
                )
        self.iter = 0
        self.loss = SmoothedLoss(sp.average_loss)
        self.last_snapshot: str | None = None
        self.snapshot_iter = -1  # the iteration of the last snapshot written (or resumed from)
        self.early_exit = False

    def _log_setup(self) -> None:
        """What Caffe logs while it sets up: the resolved solver, the nets, the devices, the starting point."""
        opts, dev = self.opts, self.procs.device
        log.info("Initializing solver from parameters: \n%s", to_text(self.sp))
        if self.procs.gpu_ids is None:
            log.info("Use CPU.")
        else:
            log.info("Using GPUs %s", ", ".join(str(i) for i in self.procs.gpu_ids))
            log.info("GPU %d: %s", dev.index, torch.cuda.get_device_name(dev))
            amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16 with a gradient scaler"}[self.amp_dtype]
            log.info("AMP %s, channels_last %s, cudnn.benchmark %s", amp, self.channels_last, opts.cudnn_benchmark)
        log.info("%d process(es), batch %d per process, random seed %d", self.procs.world_size,
                 sum(f.batch_size for f, _ in self.feeds), self.seed)  # fmt: skip
        for i, np_ in enumerate(self.net_params):
            if i == 0:
                if self.sp.HasField("net") or self.sp.HasField("train_net"):
                    log.info("Creating training net from net file: %s", self.sp.net or self.sp.train_net)
                log.info("Initializing net from parameters: \n%s", to_text(np_))
            elif self.procs.rank == 0:
                log.info("Creating test net (#%d) specified by the solver", i - 1)
                log.info("Initializing net from parameters: \n%s", to_text(np_))
        if opts.sync_bn:
            log.info("BatchNorm statistics are synchronised across processes")
        if opts.weights:
            log.info("Finetuning from %s", opts.weights)
        if self.state:
            log.info("Restoring previous solver status from %s", opts.snapshot)

    # -- state ---------------------------------------------------------------------------------

    def _restore(self) -> None:
        st, P = self.state, self.procs
        self.iter = int(st["iter"])
        self.loss.load_state_dict(st["smoothing"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        test_feeds = [[f for f, _ in feeds] for feeds in self.test_feeds]
        restore(st, rank=P.rank, world_size=P.world_size, train_feeds=[f for f, _ in self.feeds], test_feeds=test_feeds)
        self.last_snapshot = self.opts.snapshot
        self.snapshot_iter = self.iter

    def snapshot(self) -> None:
        """caffe: Solver::Snapshot -- every rank gives its RNG and data position; rank 0 writes."""
        self.snapshot_iter = self.iter  # on every rank: solve() decides on it collectively
        per_rank = D.gather_objects(local_state([f for f, _ in self.feeds]), self.procs)
        error = None
        if self.procs.rank == 0:
            try:
                state = trainer_state(
                    seed=self.seed, per_rank=per_rank, solver=self.solver, smoothing=self.loss.state_dict(),
                    test_feeds=[[f for f, _ in feeds] for feeds in self.test_feeds], scaler=self.scaler,
                )  # fmt: skip
                _, state_path = save_snapshot(self.net, state, self.prefix, self.iter)
                self.last_snapshot = str(state_path)
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

    # -- passes --------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _test_all(self) -> None:
        """caffe: Solver::TestAll -- rank 0 scores every TEST net; a STOP signal interrupts."""
        for i, (net, feeds) in enumerate(zip(self.test_nets, self.test_feeds)):
            run_test(net, feeds, self.sp.test_iter[i], it=self.iter, index=i, compute_loss=self.sp.test_compute_loss,
                     stopped=lambda: self.signals.pending == STOP)  # fmt: skip

    def _reduce(self, values: torch.Tensor) -> list[float]:
        """Sum over processes (one small all_reduce per iteration carries loss, outputs and signals)."""
        if self.procs.distributed:
            dist.all_reduce(values)
        return values.tolist()

    def step(self) -> None:
        """Caffe's Step loop up to max_iter (see the module docstring)."""
        sp, P = self.sp, self.procs
        iter_size, world = sp.iter_size, P.world_size
        images = sum(f.batch_size for f, _ in self.feeds) * iter_size * world
        timer, iter_last = time.time(), self.iter
        while self.iter < sp.max_iter:
            if sp.test_interval and self.iter % sp.test_interval == 0 and (self.iter > 0 or sp.test_initialization):
                if P.rank == 0:
                    self._test_all()
            display = bool(sp.display) and self.iter % sp.display == 0
            self.net.zero_grad(set_to_none=False)
            loss_sum = torch.zeros((), device=P.device)
            for k in range(iter_size):
                sync = k == iter_size - 1 or not P.distributed
                with self.model.no_sync() if not sync else contextlib.nullcontext():
                    with self._autocast():
                        out = self.model(**net_inputs(self.feeds))
                        loss = self.net.loss(out)
                    if loss.requires_grad:
                        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                loss_sum += loss.detach()
            pending = self.signals.take()
            parts = [
                loss_sum.reshape(1) / iter_size,
                torch.tensor([pending == SNAPSHOT, pending == STOP], device=P.device),
            ]
            if display:
                vec, counts = flat_outputs(self.net, out)
                parts.append(vec)
            red = self._reduce(torch.cat([p.float() for p in parts]))
            loss_value = red[0] / world
            if not math.isfinite(loss_value):
                msg = (f"Iteration {self.iter}, loss = {g(loss_value)}: the loss is not finite, stopping; "
                       f"last good snapshot: {self.last_snapshot or 'none'}")  # fmt: skip
                log.error(msg)
                raise TrainingDiverged(msg)
            self.loss.update(loss_value, self.iter)
            if display:
                lapse = time.time() - timer
                per_s = (self.iter - iter_last) / (lapse or 1)
                log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s",
                         self.iter, g(per_s), g(lapse), sp.display, g(self.loss.smoothed))  # fmt: skip
                log_outputs(self.net, [v / world for v in red[3:]], counts, "Train")
                if self.iter > iter_last:
                    eta = (sp.max_iter - self.iter) / per_s if per_s else float("inf")
                    log.info("    Speed: %.1f images/s (%d per iteration), ETA %s", per_s * images, images, hms(eta))
                timer, iter_last = time.time(), self.iter
            self.solver.apply_update(self.iter, self.scaler, display=display)
            self.iter += 1
            action = (SNAPSHOT if red[1] > 0 else NONE) if red[2] == 0 else STOP
            # caffe: Solver::Step snapshots periodically or on a SNAPSHOT request; a STOP's snapshot
            # comes from Solve (snapshot_after_train), so it is written once
            if (sp.snapshot and self.iter % sp.snapshot == 0) or action == SNAPSHOT:
                self.snapshot()
            if action == STOP:
                self.early_exit = True
                break

    def solve(self) -> None:
        """caffe: Solver::Solve -- Step to max_iter, snapshot at the end, a final display and test."""
        sp, P = self.sp, self.procs
        if self.state:
            self._restore()
        else:
            # different random streams per process (dropout), the same data order everywhere
            torch.manual_seed(self.seed + P.rank)
        self._log_setup()
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", sp.lr_policy)
        with Signals(self.opts.sigint_effect, self.opts.sighup_effect) as self.signals:
            self.step()
            if sp.snapshot_after_train and self.snapshot_iter != self.iter:
                self.snapshot()
            if self.early_exit:
                log.info("Optimization stopped early.")
                return
            if sp.display and self.iter % sp.display == 0:
                # caffe: Solve's extra TRAIN forward for the last display. Unlike Caffe we keep its
                # BatchNorm statistics out of the net, so the final test scores the saved snapshot.
                saved = [b.clone() for b in self.net.buffers()]
                with torch.no_grad(), self._autocast():
                    loss = self.net.loss(self.model(**net_inputs(self.feeds))).reshape(1)
                    for b, old in zip(self.net.buffers(), saved):
                        b.copy_(old)
                loss_value = self._reduce(loss.float())[0] / P.world_size
                self.loss.update(loss_value, self.iter)
                log.info("Iteration %d, loss = %s", self.iter, g(self.loss.smoothed))
            if sp.test_interval and self.iter % sp.test_interval == 0 and P.rank == 0:
                self._test_all()
        log.info("Optimization Done.")

    def close(self, clean: bool = True) -> None:
        for feed, _ in self.feeds + [f for feeds in self.test_feeds for f in feeds]:
            feed.close()
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
