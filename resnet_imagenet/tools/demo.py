"""``make demo``: the whole pipeline on the built-in dataset, each step an ordinary command.

demo_data -> convert_imageset (train, val) -> compute_image_mean -> train (what ``./train.sh cpu resnet_tiny
resnet_tiny_`` runs) -> test -> prune 2x + fine-tune + test -> classify -> parse_log / plot_log. Everything runs in
one output folder (default ./demo_out) laid out as the repository root is for ImageNet (data/, prototxt_like/,
snapshots/, logs/), with the zoo's resnet_tiny prototxts written there by the generator (net/zoo.py), so no
source checkout is needed. Each step runs as ``python -m resnet_imagenet ...`` and is printed as a user types it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from resnet_imagenet.net.zoo import generate
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text, to_text
from resnet_imagenet.tools import add_command
from resnet_imagenet.util.glog import error_line

log = logging.getLogger(__name__)

NET = "resnet_tiny"
MARKER = "DEMO_OUTPUT"  # marks a folder the demo made, so a rerun may replace it
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder that holds resnet_imagenet/
_GLOG_INFO = re.compile(r"I\d{4} \d\d:\d\d:\d\d\.\d+ ")  # info lines; the commands' own output is shown
_SHOW = re.compile(r"Iteration \d+ \(|Iteration \d+, Testing|Test net output|Snapshotting to binary|Optimization Done")


@dataclass
class DemoConfig:
    out: Path = Path("demo_out")
    train_per_class: int | None = None  # None: demo_data's default
    val_per_class: int | None = None  # None: demo_data's default
    seed: int | None = None  # None: demo_data's default
    image_size: int = 40  # LMDB images are resized to this square (crop_size 32 in the tiny net)
    max_iter: int | None = None  # None: the zoo solver's max_iter
    classify_count: int = 3
    quiet: bool = False


@dataclass
class DemoResult:
    top1_before: float | None = None
    top1_pruned: float | None = None  # after pruning, before fine-tuning
    top1_after: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _child_env() -> dict[str, str]:
    """The environment of the steps: ours, plus PYTHONPATH to this package when it is not installed."""
    env = dict(os.environ)
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if _PACKAGE_PARENT not in installed:  # a source tree (or editable install): the steps run in another folder
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(_PACKAGE_PARENT), env.get("PYTHONPATH", "")] if p)
    return env


class _Runner:
    """Runs ``resnet-imagenet`` commands in the output folder, echoing them as a user would type them."""

    def __init__(self, cwd: Path, quiet: bool):
        self.cwd, self.quiet, self.env = cwd, quiet, _child_env()

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def run(self, args: list[str], *, log_file: str | None = None, filter_output: bool = False) -> str:
        """Run ``resnet-imagenet ARGS`` (as ``python -m resnet_imagenet``), its output also into ``log_file``.

        Prints the command, then its output (only training's key lines with ``filter_output``); returns the output.
        """
        shown = "resnet-imagenet " + shlex.join(args) + (f" 2>&1 | tee {log_file}" if log_file else "")
        self.say(f"$ {shown}")
        argv = [sys.executable, "-m", "resnet_imagenet", *args]
        proc = subprocess.Popen(
            argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        lines = []
        with open(self.cwd / log_file if log_file else os.devnull, "w", encoding="utf-8") as fh:
            for line in proc.stdout:
                lines.append(line)
                fh.write(line)
                fh.flush()
                if _SHOW.search(line) if filter_output else not _GLOG_INFO.match(line):
                    self.say("    " + line.rstrip("\n"))
        proc.wait()
        if proc.returncode != 0:
            tail = "".join(lines[-15:])
            raise RuntimeError(f"demo step failed (exit {proc.returncode}): {shown}\n{tail}")
        return "".join(lines)


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} exists and was not made by the demo; choose another --out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("Made by `resnet-imagenet demo`; a rerun replaces this folder.\n")


def _test_batch(train_val: str) -> int:
    tv = parse_text(train_val, caffe_pb2.NetParameter(), "train_val.prototxt")
    tests = [lp for lp in tv.layer if lp.type == "Data" and any(r.phase == caffe_pb2.TEST for r in lp.include)]
    return tests[0].data_param.batch_size


def _demo_solver(text: str, test_batch: int, val_images: int, max_iter: int | None) -> str:
    """The zoo's solver, testing every val image once per test pass; ``max_iter`` scales its schedule."""
    sp = parse_text(text, caffe_pb2.SolverParameter(), f"{NET}_solver.prototxt")
    sp.test_iter[:] = [math.ceil(val_images / test_batch)]
    if max_iter is not None:
        sp.max_iter = max_iter
        sp.stepsize = max(1, max_iter * 3 // 4)
        sp.snapshot = max(1, max_iter // 2)
        sp.test_interval = max(1, max_iter // 2)
        sp.display = sp.average_loss = max(1, min(sp.display, max_iter // 10))
    return f"# The zoo's {NET} solver; test_iter covers the {val_images} demo val images\n" + to_text(sp)


def _write_nets(out: Path, cfg: DemoConfig, val_images: int) -> Path:
    """prototxt_like/resnet_tiny/ in the output folder, from the zoo's generator."""
    files = generate(NET)
    folder = out / "prototxt_like" / NET
    folder.mkdir(parents=True)
    for name, text in files.items():
        if name.endswith("_solver.prototxt"):
            text = _demo_solver(text, _test_batch(files["train_val.prototxt"]), val_images, cfg.max_iter)
        (folder / name).write_text(text)
    return folder


def _top1(output: str) -> float:
    m = re.search(r"^accuracy@1 = ([0-9.e+-]+)$", output, re.M)  # test prints each output blob (the zoo's top-1)
    if not m:
        raise RuntimeError(f"no top-1 in the test output:\n{output[-2000:]}")
    return float(m.group(1))


def _snapshots(out: Path, prefix: str) -> list[Path]:
    """The ``snapshots/<prefix>_iter_N.caffemodel`` files in iteration order; at least one."""
    snaps = sorted(out.glob(f"snapshots/{prefix}_iter_*.caffemodel"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not snaps:
        raise RuntimeError(f"training wrote no snapshot {out}/snapshots/{prefix}_iter_*.caffemodel")
    return snaps


class _Demo:
    """The demo's steps in ``cfg.out``, in order; each runs its commands and keeps what the next needs."""

    def __init__(self, cfg: DemoConfig):
        self.cfg, self.out = cfg, cfg.out.resolve()
        _prepare_out(self.out)
        self.r = _Runner(self.out, cfg.quiet)
        self.res = DemoResult()
        self.tiny = f"prototxt_like/{NET}"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def data(self) -> None:
        cfg, r, size = self.cfg, self.r, str(self.cfg.image_size)
        r.say(f"== 1. a built-in dataset of JPEGs in class folders -> {self.out}/images")
        flags = {"--train-per-class": cfg.train_per_class, "--val-per-class": cfg.val_per_class, "--seed": cfg.seed}
        r.run(["demo_data", "images"] + [s for k, v in flags.items() if v is not None for s in (k, str(v))])
        self.val_images = len(list((self.out / "images" / "val").rglob("*.jpg")))
        r.say("\n== 2. convert_imageset: class folders -> LMDBs of Datum records (resized, as for ImageNet)")
        for split, extra in (("train", ["--shuffle"]), ("val", [])):
            args = [f"images/{split}/", f"data/tiny_{split}_lmdb", "--resize_height", size, "--resize_width", size]
            r.run(["convert_imageset", *args, *extra, "--no-progress"])
        r.say("\n== 3. compute_image_mean: the BGR mean image of the training LMDB")
        r.run(["compute_image_mean", "data/tiny_train_lmdb", "data/tiny_mean.binaryproto", "--no-progress"])

    def train(self, net: str, extra: list[str] = ()) -> list[Path]:
        """``./train.sh cpu NET NET_ [extra]`` as the one process it starts, its log tee'd to logs/NET_NET_.log."""
        self.r.say(f"# in a checkout: ./train.sh cpu {shlex.join([net, f'{net}_', *extra])}")
        (self.out / "logs").mkdir(exist_ok=True)
        args = ["train", "--solver", f"prototxt_like/{net}/{net}_solver.prototxt", "--gpu", "cpu", *extra]
        self.r.run(args, log_file=f"logs/{net}_{net}_.log", filter_output=True)
        return _snapshots(self.out, net)

    def test(self, folder: str, weights: str) -> float:
        return _top1(self.r.run(["test", "--model", f"{folder}/train_val.prototxt", "--weights", weights]))

    def train_and_test(self) -> None:
        self.r.say(f"\n== 4. train the zoo's {NET} on the CPU (prototxts written to {self.out}/{self.tiny})")
        _write_nets(self.out, self.cfg, self.val_images)
        self.snaps = self.train(NET)
        self.final = self.rel(self.snaps[-1])
        self.r.say("\n== 5. test: every val image once, top-1 / top-5 / loss")
        self.res.top1_before = self.test(self.tiny, self.final)

    def prune(self) -> None:
        self.r.say("\n== 6. prune 2x (LASSO channel selection + least squares), test, fine-tune briefly, test again")
        self.pruned = pruned = f"prototxt_like/{NET}_2x"
        self.r.run(
            [
                "prune",
                "--model",
                f"{self.tiny}/train_val.prototxt",
                "--weights",
                self.final,
                "--data",
                "data/tiny_train_lmdb",
                "--speedup",
                "2.0",
                "--out",
                pruned,
            ]
        )
        pruned_w = f"{pruned}/{NET}_2x_pruned.caffemodel"
        self.res.top1_pruned = self.test(pruned, pruned_w)
        self.ft_snaps = self.train(f"{NET}_2x", ["--weights", pruned_w])
        self.res.top1_after = self.test(pruned, self.rel(self.ft_snaps[-1]))

    def classify_and_logs(self) -> None:
        r = self.r
        r.say("\n== 7. classify a few val images with the deploy net")
        imgs = sorted((self.out / "images" / "val").glob(f"*/*_{0:04d}.jpg"))[: self.cfg.classify_count]
        r.run(
            [
                "classify",
                "--model",
                f"{self.tiny}/deploy.prototxt",
                "--weights",
                self.final,
                "--mean",
                "data/tiny_mean.binaryproto",
                "--labels",
                "data/tiny_train_lmdb.classes.txt",
                *[self.rel(p) for p in imgs],
            ]
        )
        r.say("\n== 8. the training log as CSV rows and a loss curve")
        r.run(["parse_log", f"logs/{NET}_{NET}_.log", "logs"])
        r.run(["plot_log", f"logs/{NET}_{NET}_.log", "-o", "loss_curve.png"])

    def report(self, seconds: float) -> DemoResult:
        out, res = self.out, self.res
        res.seconds = seconds
        train_log = out / "logs" / f"{NET}_{NET}_.log"
        res.outputs = {
            "dataset": f"{out}/images/{{train,val}}/<class>/*.jpg",
            "LMDBs": f"{out}/data/tiny_{{train,val}}_lmdb (class list: tiny_train_lmdb.classes.txt)",
            "mean": f"{out}/data/tiny_mean.binaryproto",
            "nets": f"{out}/{self.tiny}/{{train_val,deploy,{NET}_solver}}.prototxt",
            "snapshots": ", ".join(f"{out}/{self.rel(p)}" for p in self.snaps) + " (+ .solverstate)",
            "pruned 2x": f"{out}/{self.pruned}/ (prune_report.json, {NET}_2x_pruned.caffemodel; fine-tuned: "
            f"{self.rel(self.ft_snaps[-1])})",
            "training log": f"{train_log} (CSV: {train_log.name}.train / .test in {out}/logs)",
            "loss curve": f"{out}/loss_curve.png",
        }
        self.r.say(f"\n== done in {seconds / 60:.1f} min. Outputs:")
        for k, v in res.outputs.items():
            self.r.say(f"  {k:13s} {v}")
        self.r.say(
            f"  top-1 on the {self.val_images} val images: {res.top1_before:.4f} before pruning, "
            f"{res.top1_pruned:.4f} pruned 2x, {res.top1_after:.4f} pruned 2x and fine-tuned"
        )
        return res


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the pipeline in ``cfg.out``; returns top-1 before/after pruning and where the outputs are."""
    t0 = time.time()
    demo = _Demo(cfg)
    demo.data()
    demo.train_and_test()
    demo.prune()
    demo.classify_and_logs()
    return demo.report(time.time() - t0)


# --- the command ---


def add_parser(sub: argparse._SubParsersAction) -> None:
    default = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    p = add_command(sub, "demo")
    p.add_argument(
        "--out",
        type=Path,
        default=default["out"],
        help=f"output folder (default {default['out']}; a rerun replaces it)",
    )
    p.add_argument(
        "--max-iter", type=int, default=default["max_iter"], help="training iterations (default: the zoo solver's)"
    )
    for name in ("train_per_class", "val_per_class"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default[name], help="default: demo_data's")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(
        out=args.out, max_iter=args.max_iter, train_per_class=args.train_per_class, val_per_class=args.val_per_class
    )
    try:
        run_demo(cfg)
    except RuntimeError as e:
        error_line(f"resnet-imagenet demo: error: {e}")
        return 1
    return 0
