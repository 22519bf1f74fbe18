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
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from resnet_imagenet import dist as D
from resnet_imagenet.data import DataFeed
from resnet_imagenet.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.prototxt import TEST, TRAIN, filter_net, read_net, read_solver, to_text
from resnet_imagenet.snapshot import load_solverstate, resolve_snapshot_prefix, rng_state, save_snapshot, set_rng_state
from resnet_imagenet.solver import CaffeSolver, Learnable, check_solver, learning_rate

log = logging.getLogger(__name__)

NONE, SNAPSHOT, STOP = 0, 1, 2
EFFECTS = {"none": NONE, "snapshot": SNAPSHOT, "stop": STOP}


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


def g(x: float) -> str:
    """A number as C++ streams print it (6 significant digits), as in Caffe's logs."""
    return f"{x:.6g}"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def solver_nets(sp: caffe_pb2.SolverParameter) -> tuple[caffe_pb2.NetParameter, list[caffe_pb2.NetParameter]]:
    """caffe: Solver::InitTrainNet / InitTestNets -- the TRAIN net and one TEST net per test_iter."""
    given = [f for f in ("net", "net_param", "train_net", "train_net_param") if sp.HasField(f)]
    if len(given) != 1:
        raise ValueError(
            f"the solver must give exactly one of net, net_param, train_net, train_net_param (has {given})"
        )
    general = None
    if sp.HasField("net_param"):
        general = train = sp.net_param
    elif sp.HasField("net"):
        general = train = read_net(sp.net)
    elif sp.HasField("train_net_param"):
        train = sp.train_net_param
    else:
        train = read_net(sp.train_net)
    tests = list(sp.test_net_param) + [read_net(p) for p in sp.test_net]
    if not tests and general is not None:
        tests = [general] * len(sp.test_iter)
    if len(tests) != len(sp.test_iter):
        raise ValueError(f"the solver has {len(tests)} test net(s) but {len(sp.test_iter)} test_iter value(s)")
    if sp.test_state and len(sp.test_state) != len(tests):
        raise ValueError(f"the solver has {len(sp.test_state)} test_state for {len(tests)} test net(s)")
    ts = sp.train_state
    train = filter_net(train, TRAIN, ts.level, tuple(ts.stage))
    out = []
    for i, t in enumerate(tests):
        st = sp.test_state[i] if sp.test_state else caffe_pb2.NetState()
        out.append(filter_net(t, TEST, st.level, tuple(st.stage)))
    return train, out


def share_weights(test_net: CaffeNet, train_net: CaffeNet) -> None:
    """caffe: Net::ShareTrainedLayersWith -- the TEST net's blobs become the TRAIN net's, by layer name."""
    source = dict(train_net.layers.items())
    for name, m in test_net.layers.items():
        src = source.get(name)
        if src is None:
            continue
        for attr in m.blob_names:
            mine, theirs = getattr(m, attr, None), getattr(src, attr, None)
            if mine is None or theirs is None:
                continue
            if mine.shape != theirs.shape:
                raise ValueError(
                    f"layer '{name}' blob {attr}: TEST net shape {tuple(mine.shape)}, TRAIN {tuple(theirs.shape)}"
                )
            if attr in m._parameters:
                m._parameters[attr] = theirs
            else:
                m._buffers[attr] = theirs


class Signals:
    """Caffe's SignalHandler: signals set a pending action, read once per iteration."""

    def __init__(self, sigint: str, sighup: str):
        for v in (sigint, sighup):
            if v not in EFFECTS:
                raise ValueError(f"signal effect {v!r}: one of {', '.join(EFFECTS)}")
        self.effects = {signal.SIGINT: EFFECTS[sigint], signal.SIGHUP: EFFECTS[sighup]}
        self.pending = NONE
        self._old: dict = {}

    def __enter__(self) -> Signals:
        for sig in self.effects:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.pending = max(self.pending, self.effects[signum])

    def take(self) -> int:
        action, self.pending = self.pending, NONE
        return action

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


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
        if opts.check:
            rank, _, world, local_world = D.env_procs()
            ids = D.parse_gpus(gpu, local_world)
            self.procs = D.Procs(rank, 0, world, local_world, torch.device("cpu"))
        else:
            ids = D.parse_gpus(gpu, D.env_procs()[3])
            self.procs = D.init_procs(gpu)
        P, dev = self.procs, self.procs.device
        self.gpu_ids = ids
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
        self.feeds = self._feeds(self.net, TRAIN, P.rank, P.world_size, workers)
        self.test_feeds = [self._feeds(t, TEST, 0, 1, workers) for t in self.test_nets]
        # Learnable blobs: lr_mult 0 everywhere means no gradient (caffe: param_propagate_down false).
        seen: dict[int, Learnable] = {}
        for layer, i, p, lr_mult, decay_mult in self.net.learnable():
            if id(p) not in seen:
                seen[id(p)] = Learnable(p, lr_mult, decay_mult, f"{layer}[{i}]")
        for x in seen.values():
            x.param.requires_grad_(x.lr_mult != 0)
        self.solver = CaffeSolver(sp, list(seen.values()))
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
        self.losses: list[float] = []
        self.smoothed_loss = 0.0
        self.loss_start_iter = 0
        self.last_snapshot: str | None = None
        self.snapshot_iter = -1  # the iteration of the last snapshot written (or resumed from)
        self.early_exit = False

    def _log_setup(self) -> None:
        """What Caffe logs while it sets up: the resolved solver, the nets, the devices, the starting point."""
        opts, dev = self.opts, self.procs.device
        log.info("Initializing solver from parameters: \n%s", to_text(self.sp))
        if self.gpu_ids is None:
            log.info("Use CPU.")
        else:
            log.info("Using GPUs %s", ", ".join(str(i) for i in self.gpu_ids))
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

    def _feeds(
        self, net: CaffeNet, phase: int, rank: int, world: int, workers: int
    ) -> list[tuple[DataFeed, list[str]]]:
        out = []
        for lp in net.data_layers:
            if lp.type not in ("Data", "ImageData"):
                raise ValueError(
                    f"layer '{lp.name}': a {lp.type} layer has no data to train on; use a Data layer (LMDB)"
                )
            feed = DataFeed(lp, phase, rank=rank, world_size=world, seed=self.seed, num_workers=workers,
                            device=self.procs.device, channels_last=self.channels_last)  # fmt: skip
            out.append((feed, list(lp.top)))
        if not out:
            raise ValueError(f"the {'TRAIN' if phase == TRAIN else 'TEST'} net has no Data or ImageData layer")
        return out

    # -- state ---------------------------------------------------------------------------------

    def _restore(self) -> None:
        st, P = self.state, self.procs
        self.iter = int(st["iter"])
        sm = st["smoothing"]
        self.losses, self.smoothed_loss, self.loss_start_iter = list(sm["losses"]), sm["smoothed"], sm["start_iter"]
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        r = P.rank
        if st["world_size"] != P.world_size:
            log.warning("resuming %d processes from a snapshot of %d: the data order and random streams change",
                        P.world_size, st["world_size"])  # fmt: skip
            r = 0
        for (feed, _), fs in zip(self.feeds, st["train_feeds"][r]):
            if st["world_size"] == P.world_size:
                feed.load_state_dict(fs)
        for feeds, saved in zip(self.test_feeds, st["test_feeds"]):
            for (feed, _), fs in zip(feeds, saved):
                feed.load_state_dict(fs)
        set_rng_state(st["rng"][r])
        self.last_snapshot = self.opts.snapshot
        self.snapshot_iter = self.iter

    def snapshot(self) -> None:
        """caffe: Solver::Snapshot -- every rank gives its RNG and data position; rank 0 writes."""
        self.snapshot_iter = self.iter  # on every rank: solve() decides on it collectively
        per_rank = D.gather_objects({"rng": rng_state(), "feeds": [f.state_dict() for f, _ in self.feeds]}, self.procs)
        if self.procs.rank != 0:
            return
        state = {
            "seed": self.seed,
            "world_size": self.procs.world_size,
            "solver": self.solver.state_dict(),
            "rng": [x["rng"] for x in per_rank],
            "train_feeds": [x["feeds"] for x in per_rank],
            "test_feeds": [[f.state_dict() for f, _ in feeds] for feeds in self.test_feeds],
            "smoothing": {
                "losses": list(self.losses),
                "smoothed": self.smoothed_loss,
                "start_iter": self.loss_start_iter,
            },
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
        }
        _, state_path = save_snapshot(self.net, state, self.prefix, self.iter)
        self.last_snapshot = str(state_path)

    # -- passes --------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    @staticmethod
    def _inputs(feeds: list[tuple[DataFeed, list[str]]]) -> dict[str, torch.Tensor]:
        out = {}
        for feed, tops in feeds:
            data, label = feed.next()
            out[tops[0]] = data
            if len(tops) > 1:
                out[tops[1]] = label
        return out

    @staticmethod
    def _loss(net: CaffeNet, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * out[name].float().sum() for name, w in net.loss_weights.items())

    def _outputs(self, net: CaffeNet, vec: list[float], what: str) -> None:
        """Caffe's ``    Train net output #k: name = v (* w = w*v loss)`` lines, one per output element."""
        k = 0
        for name in net.output_names:
            w = net.loss_weights.get(name, 0.0)
            for _ in range(self._counts[id(net)][name]):
                v = vec[k]
                extra = f" (* {g(w)} = {g(w * v)} loss)" if w else ""
                log.info("    %s net output #%d: %s = %s%s", what, k, name, g(v), extra)
                k += 1

    def _flat_outputs(self, net: CaffeNet, out: dict[str, torch.Tensor]) -> torch.Tensor:
        self._counts = getattr(self, "_counts", {})
        self._counts[id(net)] = {n: out[n].numel() for n in net.output_names}
        return torch.cat([out[n].detach().float().reshape(-1) for n in net.output_names])

    def test(self, i: int) -> None:
        """caffe: Solver::Test -- mean of every output over test_iter batches of the TEST net (rank 0)."""
        net, feeds, n = self.test_nets[i], self.test_feeds[i], self.sp.test_iter[i]
        log.info("Iteration %d, Testing net (#%d)", self.iter, i)
        scores, loss = None, 0.0
        # fp32 even under AMP: bf16 logits tie often, and Caffe's Accuracy counts ties against the label
        with torch.no_grad():
            for _ in range(n):
                if self.signals.pending == STOP:
                    log.info("Test interrupted.")
                    return
                out = net(**self._inputs(feeds))
                vec = self._flat_outputs(net, out)
                scores = vec if scores is None else scores + vec
                if self.sp.test_compute_loss:
                    loss += float(self._loss(net, out))
        if self.sp.test_compute_loss:
            log.info("Test loss: %s", g(loss / n))
        if scores is not None:
            self._outputs(net, (scores / n).tolist(), "Test")

    def _update_smoothed_loss(self, loss: float) -> None:
        # caffe: Solver::UpdateSmoothedLoss -- the mean of the last average_loss losses
        avg = self.sp.average_loss
        if len(self.losses) < avg:
            self.losses.append(loss)
            self.smoothed_loss = (self.smoothed_loss * (len(self.losses) - 1) + loss) / len(self.losses)
        else:
            idx = (self.iter - self.loss_start_iter) % avg
            self.smoothed_loss += (loss - self.losses[idx]) / avg
            self.losses[idx] = loss

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
                    for i in range(len(self.test_nets)):
                        self.test(i)
            display = bool(sp.display) and self.iter % sp.display == 0
            self.net.zero_grad(set_to_none=False)
            loss_sum = torch.zeros((), device=P.device)
            for k in range(iter_size):
                sync = k == iter_size - 1 or not P.distributed
                with self.model.no_sync() if not sync else contextlib.nullcontext():
                    with self._autocast():
                        out = self.model(**self._inputs(self.feeds))
                        loss = self._loss(self.net, out)
                    if loss.requires_grad:
                        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                loss_sum += loss.detach()
            pending = self.signals.take()
            parts = [
                loss_sum.reshape(1) / iter_size,
                torch.tensor([pending == SNAPSHOT, pending == STOP], device=P.device),
            ]
            if display:
                parts.append(self._flat_outputs(self.net, out))
            red = self._reduce(torch.cat([p.float() for p in parts]))
            loss_value = red[0] / world
            if not math.isfinite(loss_value):
                msg = (f"Iteration {self.iter}, loss = {g(loss_value)}: the loss is not finite, stopping; "
                       f"last good snapshot: {self.last_snapshot or 'none'}")  # fmt: skip
                log.error(msg)
                raise TrainingDiverged(msg)
            self._update_smoothed_loss(loss_value)
            if display:
                lapse = time.time() - timer
                per_s = (self.iter - iter_last) / (lapse or 1)
                log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s",
                         self.iter, g(per_s), g(lapse), sp.display, g(self.smoothed_loss))  # fmt: skip
                self._outputs(self.net, [v / world for v in red[3:]], "Train")
                if self.iter > iter_last:
                    eta = (sp.max_iter - self.iter) / per_s if per_s else float("inf")
                    log.info("    Speed: %.1f images/s (%d per iteration), ETA %s", per_s * images, images, _hms(eta))
                timer, iter_last = time.time(), self.iter
            self._apply_update(display)
            self.iter += 1
            action = (SNAPSHOT if red[1] > 0 else NONE) if red[2] == 0 else STOP
            # caffe: Solver::Step snapshots periodically or on a SNAPSHOT request; a STOP's snapshot
            # comes from Solve (snapshot_after_train), so it is written once
            if (sp.snapshot and self.iter % sp.snapshot == 0) or action == SNAPSHOT:
                self.snapshot()
            if action == STOP:
                self.early_exit = True
                break

    def _apply_update(self, display: bool) -> float:
        rate = learning_rate(self.sp, self.iter)
        if display:
            log.info("Iteration %d, lr = %s", self.iter, g(rate))
        if self.scaler is None:
            self.solver.apply_update(self.iter)
            return rate
        # fp16: unscale the gradients; skip the update when they overflowed (the scaler then shrinks)
        self.scaler.unscale_(self._scaler_opt)
        self.scaler.step(self._scaler_opt)
        self.scaler.update()
        return rate

    def solve(self) -> None:
        """caffe: Solver::Solve -- Step to max_iter, snapshot at the end, a final display and test."""
        sp, P = self.sp, self.procs
        if self.scaler is not None:
            self._scaler_opt = _UpdateStep([x.param for x in self.solver.learnables], self)
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
                    loss = self._loss(self.net, self.model(**self._inputs(self.feeds))).reshape(1)
                    for b, old in zip(self.net.buffers(), saved):
                        b.copy_(old)
                loss_value = self._reduce(loss.float())[0] / P.world_size
                self._update_smoothed_loss(loss_value)
                log.info("Iteration %d, loss = %s", self.iter, g(self.smoothed_loss))
            if sp.test_interval and self.iter % sp.test_interval == 0 and P.rank == 0:
                for i in range(len(self.test_nets)):
                    self.test(i)
        log.info("Optimization Done.")

    def close(self, clean: bool = True) -> None:
        for feed, _ in self.feeds + [f for feeds in self.test_feeds for f in feeds]:
            feed.close()
        if not self.opts.check:
            D.close_procs(self.procs, clean)


class _UpdateStep(torch.optim.Optimizer):
    """Lets torch's GradScaler unscale our gradients and skip Caffe's update when they overflowed."""

    def __init__(self, params, trainer: Trainer):
        super().__init__(params, {})
        self.trainer = trainer

    def step(self, closure=None):
        self.trainer.solver.apply_update(self.trainer.iter)


def train(opts: TrainOptions) -> int:
    """Run ``resnet-imagenet train``. Returns 0; raises ValueError on bad input, TrainingDiverged on NaN."""
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
