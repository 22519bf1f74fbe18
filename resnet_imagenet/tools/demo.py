"""``make demo``: the whole pipeline on the built-in dataset, each step a shell line as the README shows it.

demo_data -> convert_imageset (train, val) -> compute_image_mean -> ./train.sh -> test -> prune 2x -> test ->
./train.sh (fine-tune) -> test -> classify -> parse_log / plot_log. Everything runs in one output folder (default
./demo_out) laid out as the repository root is for ImageNet (data/, prototxt_like/, snapshots/, logs/, train.sh),
with the zoo's resnet_tiny prototxts written there by the generator (net/zoo.py), so no source checkout is needed.
The lines run by ``bash`` are exactly :func:`demo_commands` (README's "The demo" block is tested against them).
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
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from resnet_imagenet.net.zoo import generate
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text, to_text
from resnet_imagenet.prune.export import FINETUNE_ITER_DIVISOR
from resnet_imagenet.tools import add_command
from resnet_imagenet.util.glog import error_line

log = logging.getLogger(__name__)

NET = "resnet_tiny"
MARKER = "DEMO_OUTPUT"  # marks a folder the demo made, so a rerun may replace it
CLASSIFY = ("disc", "ring", "triangle")  # demo_data class folders whose first val image classify shows
TRAIN_SH = Path(__file__).resolve().parents[1] / "train.sh"  # package data; the checkout's ./train.sh links to it
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
    classify_count: int = len(CLASSIFY)
    quiet: bool = False


@dataclass
class DemoResult:
    top1_before: float | None = None
    top1_pruned: float | None = None  # after pruning, before fine-tuning
    top1_after: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _zoo_max_iter() -> int:
    return parse_text(generate(NET)[f"{NET}_solver.prototxt"], caffe_pb2.SolverParameter(), "zoo solver").max_iter


def demo_commands(cfg: DemoConfig) -> list[tuple[str, str]]:
    """The demo's steps as ``(what, shell line)`` pairs, run in order from ``cfg.out``."""
    size, tiny, pruned = str(cfg.image_size), f"prototxt_like/{NET}", f"prototxt_like/{NET}_2x"
    last = cfg.max_iter or _zoo_max_iter()
    final, pruned_w = f"snapshots/{NET}_iter_{last}.caffemodel", f"{pruned}/{NET}_2x_pruned.caffemodel"
    tuned = f"snapshots/{NET}_2x_iter_{max(1, last // FINETUNE_ITER_DIVISOR)}.caffemodel"
    flags = {"--train-per-class": cfg.train_per_class, "--val-per-class": cfg.val_per_class, "--seed": cfg.seed}
    ri, lines = "resnet-imagenet", []

    def add(what: str, *args: str) -> None:
        lines.append((what, shlex.join(args)))

    add("data", ri, "demo_data", "images", *[s for k, v in flags.items() if v is not None for s in (k, str(v))])
    for split, extra in (("train", ["--shuffle"]), ("val", [])):
        resize = ["--resize_height", size, "--resize_width", size]
        add("convert", ri, "convert_imageset", f"images/{split}/", f"data/tiny_{split}_lmdb", *resize, *extra)
    add("mean", ri, "compute_image_mean", "data/tiny_train_lmdb", "data/tiny_mean.binaryproto")
    add("train", "./train.sh", "cpu", NET, f"{NET}_")
    add("test_before", ri, "test", "--model", f"{tiny}/train_val.prototxt", "--weights", final)
    data = ["--data", "data/tiny_train_lmdb", "--speedup", "2.0", "--out", pruned]
    add("prune", ri, "prune", "--model", f"{tiny}/train_val.prototxt", "--weights", final, *data)
    add("test_pruned", ri, "test", "--model", f"{pruned}/train_val.prototxt", "--weights", pruned_w)
    add("train", "./train.sh", "cpu", f"{NET}_2x", f"{NET}_2x_", "--weights", pruned_w)
    add("test_after", ri, "test", "--model", f"{pruned}/train_val.prototxt", "--weights", tuned)
    imgs = [f"images/val/{c}/{c}_0000.jpg" for c in CLASSIFY[: cfg.classify_count]]
    model = ["--model", f"{tiny}/deploy.prototxt", "--weights", final, "--mean", "data/tiny_mean.binaryproto"]
    add("classify", ri, "classify", *model, "--labels", "data/tiny_train_lmdb.classes.txt", *imgs)
    add("logs", ri, "parse_log", f"logs/{NET}_{NET}_.log", "logs")
    add("logs", ri, "plot_log", f"logs/{NET}_{NET}_.log", "-o", "loss_curve.png")
    return lines


_HEADERS = {
    "data": "1. a built-in dataset of JPEGs in class folders -> images/",
    "convert": "2. convert_imageset: class folders -> LMDBs of Datum records (resized, as for ImageNet)",
    "mean": "3. compute_image_mean: the BGR mean image of the training LMDB",
    "train": f"4. train the zoo's {NET} on the CPU (prototxts written to prototxt_like/{NET}/)",
    "test_before": "5. test: every val image once, top-1 / top-5 / loss",
    "prune": "6. prune 2x (LASSO channel selection + least squares), test, fine-tune briefly, test again",
    "classify": "7. classify a few val images with the deploy net",
    "logs": "8. the training log as CSV rows and a loss curve",
}


def _child_env(bin_dir: Path) -> dict[str, str]:
    """The steps' environment: ``resnet-imagenet`` and this Python first on PATH, no progress bars."""
    env = dict(os.environ, TQDM_DISABLE="1", RESNET_IMAGENET_PYTHON=sys.executable)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if _PACKAGE_PARENT not in installed:  # a source tree (or editable install): the steps run in another folder
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(_PACKAGE_PARENT), env.get("PYTHONPATH", "")] if p)
    return env


def _shim(bin_dir: Path) -> None:
    """A ``resnet-imagenet`` command running this interpreter (the installed script may not be on PATH)."""
    exe = bin_dir / "resnet-imagenet"
    exe.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m resnet_imagenet "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


class _Runner:
    """Runs shell lines in the output folder, echoing them as a user types them."""

    def __init__(self, cwd: Path, bin_dir: Path, quiet: bool):
        self.cwd, self.quiet, self.env = cwd, quiet, _child_env(bin_dir)

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def run(self, line: str, *, filter_output: bool = False) -> str:
        """Run ``line`` with bash; prints it, then its output (training's key lines only with ``filter_output``)."""
        self.say(f"$ {line}")
        proc = subprocess.Popen(
            ["bash", "-c", line], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1,
        )  # fmt: skip
        lines = []
        for out in proc.stdout:
            lines.append(out)
            if _SHOW.search(out) if filter_output else not _GLOG_INFO.match(out):
                self.say("    " + out.rstrip("\n"))
        proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"demo step failed (exit {proc.returncode}): {line}\n{''.join(lines[-15:])}")
        return "".join(lines)


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} exists and was not made by the demo; choose another --out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("Made by `resnet-imagenet demo`; a rerun replaces this folder.\n")
    shutil.copy2(TRAIN_SH, out / "train.sh")


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


def _write_nets(out: Path, cfg: DemoConfig) -> int:
    """prototxt_like/resnet_tiny/ in the output folder, from the zoo's generator; returns the val image count."""
    val_images = len(list((out / "images" / "val").rglob("*.jpg")))
    files = generate(NET)
    tv = parse_text(files["train_val.prototxt"], caffe_pb2.NetParameter(), "train_val.prototxt")
    test_batch = next(
        lp.data_param.batch_size for lp in tv.layer if lp.type == "Data" and lp.include[0].phase == caffe_pb2.TEST
    )
    folder = out / "prototxt_like" / NET
    folder.mkdir(parents=True)
    for name, text in files.items():
        if name.endswith("_solver.prototxt"):
            text = _demo_solver(text, test_batch, val_images, cfg.max_iter)
        (folder / name).write_text(text)
    return val_images


def _top1(output: str) -> float:
    m = re.search(r"^accuracy@1 = ([0-9.e+-]+)$", output, re.M)  # test prints each output blob (the zoo's top-1)
    if not m:
        raise RuntimeError(f"no top-1 in the test output:\n{output[-2000:]}")
    return float(m.group(1))


def _report(out: Path, res: DemoResult, val_images: int, say) -> None:
    log_ = out / "logs" / f"{NET}_{NET}_.log"
    res.outputs = {
        "dataset": f"{out}/images/{{train,val}}/<class>/*.jpg",
        "LMDBs": f"{out}/data/tiny_{{train,val}}_lmdb (class list: tiny_train_lmdb.classes.txt)",
        "mean": f"{out}/data/tiny_mean.binaryproto",
        "nets": f"{out}/prototxt_like/{NET}/ and {NET}_2x/ (train_val, deploy, solver; prune_report.json)",
        "snapshots": f"{out}/snapshots/{NET}_iter_N and {NET}_2x_iter_N (.caffemodel + .solverstate)",
        "training log": f"{log_} -> the dated log train.sh wrote (CSV: {log_.name}.train / .test)",
        "loss curve": f"{out}/loss_curve.png",
    }
    say(f"\n== done in {res.seconds / 60:.1f} min. Outputs:")
    for k, v in res.outputs.items():
        say(f"  {k:13s} {v}")
    say(
        f"  top-1 on the {val_images} val images: {res.top1_before:.4f} before pruning, "
        f"{res.top1_pruned:.4f} pruned 2x, {res.top1_after:.4f} pruned 2x and fine-tuned"
    )
    say(f"\nTo run these lines yourself: `. .venv/bin/activate` (or put .venv/bin on PATH), then `cd {out}`.")


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run :func:`demo_commands` in ``cfg.out``; returns top-1 before/after pruning and where the outputs are."""
    t0, out, res = time.time(), cfg.out.resolve(), DemoResult()
    _prepare_out(out)
    with tempfile.TemporaryDirectory(prefix="resnet-imagenet-demo-bin-") as bin_dir:
        if not shutil.which("resnet-imagenet", path=str(Path(sys.executable).parent)):
            _shim(Path(bin_dir))
        r, val_images, said = _Runner(out, Path(bin_dir), cfg.quiet), 0, set()
        for what, line in demo_commands(cfg):
            header = _HEADERS.get(what)
            if header and header not in said:
                said.add(header)
                r.say(f"\n== {header}")
            if what == "train" and not val_images:
                val_images = _write_nets(out, cfg)
            text = r.run(line, filter_output=what == "train")
            if what.startswith("test_"):
                setattr(res, "top1_" + what[5:], _top1(text))
    res.seconds = time.time() - t0
    _report(out, res, val_images, r.say)
    return res


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
