"""``make demo``: the whole pipeline on the built-in dataset, each step an ordinary command.

demo_data -> convert_imageset (train, val) -> compute_image_mean -> ./train.sh cpu resnet_tiny resnet_tiny_
-> test -> prune 2x + fine-tune + test -> classify -> parse_log / plot_log. Everything runs in one output folder
(default ./demo_out) laid out as the repository root is for ImageNet (data/, prototxt_like/, snapshots/, logs/),
so the zoo's resnet_tiny prototxts run unchanged there; each command is printed as the README would show it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text, to_text
from resnet_imagenet.tools import add_command
from resnet_imagenet.util.glog import error_line

log = logging.getLogger(__name__)

NET = "resnet_tiny"
MARKER = "DEMO_OUTPUT"  # marks a folder the demo made, so a rerun may replace it
REPO = Path(__file__).resolve().parents[2]
_GLOG_INFO = re.compile(r"I\d{4} \d\d:\d\d:\d\d\.\d+ ")  # info lines; the commands' own output is shown
_SHOW = re.compile(r"Iteration \d+ \(|Iteration \d+, Testing|Test net output|Snapshotting to binary|Optimization Done")


@dataclass
class DemoConfig:
    out: Path = Path("demo_out")
    train_per_class: int = 100
    val_per_class: int = 50
    image_size: int = 40  # LMDB images are resized to this square (crop_size 32 in the tiny net)
    max_iter: int | None = None  # None: the zoo solver's (400)
    seed: int = 0
    classify_count: int = 3
    quiet: bool = False


@dataclass
class DemoResult:
    top1_before: float | None = None
    top1_pruned: float | None = None  # after pruning, before fine-tuning
    top1_after: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _cli() -> list[str]:
    return [sys.executable, "-m", "resnet_imagenet"]


class _Runner:
    """Runs commands in the output folder, echoing them as a user would type them."""

    def __init__(self, cwd: Path, quiet: bool):
        self.cwd, self.quiet = cwd, quiet
        self.env = dict(os.environ)
        pkg_parent = str(REPO)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in [pkg_parent, self.env.get("PYTHONPATH", "")] if p)

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def run(self, argv: list[str], *, shown: str, log_file: Path | None = None, filter_output: bool = False) -> str:
        """Run ``argv``; print ``$ shown``; return stdout+stderr; show its output (or only training's key lines)."""
        self.say(f"$ {shown}")
        proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)  # fmt: skip
        lines = []
        fh = open(log_file, "w", encoding="utf-8") if log_file else None
        try:
            for line in proc.stdout:
                lines.append(line)
                if fh:
                    fh.write(line)
                    fh.flush()
                if _SHOW.search(line) if filter_output else not _GLOG_INFO.match(line):
                    self.say("    " + line.rstrip("\n"))
        finally:
            proc.wait()
            if fh:
                fh.close()
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


def _zoo_files() -> dict[str, str]:
    """The zoo's resnet_tiny prototxts: from the generator, else the repository's prototxt_like/."""
    try:
        from resnet_imagenet.net.zoo import generate

        return generate(NET)
    except ImportError:
        src = REPO / "prototxt_like" / NET
        if not src.is_dir():
            raise FileNotFoundError(f"{src}: the zoo's {NET} prototxts are missing") from None
        return {p.name: p.read_text() for p in src.glob("*.prototxt")}


def _write_nets(out: Path, cfg: DemoConfig, val_images: int) -> Path:
    """prototxt_like/resnet_tiny/ in the output folder; the solver tests every val image once per test pass."""
    files = _zoo_files()
    folder = out / "prototxt_like" / NET
    folder.mkdir(parents=True)
    for name, text in files.items():
        if name.endswith("_solver.prototxt"):
            sp = parse_text(text, caffe_pb2.SolverParameter(), name)
            tv = parse_text(files["train_val.prototxt"], caffe_pb2.NetParameter(), "train_val.prototxt")
            test_batch = next(lp.data_param.batch_size for lp in tv.layer if lp.type == "Data" and
                              any(r.phase == caffe_pb2.TEST for r in lp.include))  # fmt: skip
            sp.test_iter[:] = [math.ceil(val_images / test_batch)]
            if cfg.max_iter is not None:
                sp.max_iter = cfg.max_iter
                sp.stepsize = max(1, cfg.max_iter * 3 // 4)
                sp.snapshot = max(1, cfg.max_iter // 2)
                sp.test_interval = max(1, cfg.max_iter // 2)
                sp.display = sp.average_loss = max(1, min(sp.display, cfg.max_iter // 10))
            text = f"# The zoo's {NET} solver; test_iter covers the {val_images} demo val images\n" + to_text(sp)
        (folder / name).write_text(text)
    return folder


def _top1(output: str) -> float:
    m = re.search(r"^top-1 = ([0-9.]+)$", output, re.M)
    if not m:
        raise RuntimeError(f"no top-1 in the test output:\n{output[-2000:]}")
    return float(m.group(1))


def _train_command(net: str, cli: list[str], extra: list[str] = ()) -> tuple[list[str], str]:
    """``./train.sh cpu NET NET_ [extra]``, as a user types it in the project root."""
    train_sh = REPO / "train.sh"
    argv = ["bash", str(train_sh), "cpu", net, f"{net}_", *extra]
    return argv, shlex.join([str(train_sh), "cpu", net, f"{net}_", *extra])


def _snapshots(out: Path, prefix: str) -> list[Path]:
    """The ``snapshots/<prefix>_iter_N.caffemodel`` files in iteration order; at least one."""
    snaps = sorted(out.glob(f"snapshots/{prefix}_iter_*.caffemodel"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not snaps:
        raise RuntimeError(f"training wrote no snapshot {out}/snapshots/{prefix}_iter_*.caffemodel")
    return snaps


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the pipeline in ``cfg.out``; returns top-1 before/after pruning and where the outputs are."""
    t0 = time.time()
    out = cfg.out.resolve()
    _prepare_out(out)
    r = _Runner(out, cfg.quiet)
    res = DemoResult()
    cli, tiny = _cli(), f"prototxt_like/{NET}"
    n_classes_train = cfg.train_per_class
    size = str(cfg.image_size)

    r.say(f"== 1. a built-in dataset of JPEGs in class folders -> {out}/images")
    r.run(cli + ["demo_data", "images", "--train-per-class", str(n_classes_train), "--val-per-class",
                 str(cfg.val_per_class), "--seed", str(cfg.seed)],
          shown=f"resnet-imagenet demo_data images --train-per-class {n_classes_train} "
                f"--val-per-class {cfg.val_per_class}")  # fmt: skip
    val_images = len(list((out / "images" / "val").rglob("*.jpg")))

    r.say("\n== 2. convert_imageset: class folders -> LMDBs of Datum records (resized, as for ImageNet)")
    for split, extra in (("train", ["--shuffle"]), ("val", [])):
        args = [f"images/{split}/", f"data/tiny_{split}_lmdb", "--resize_height", size, "--resize_width", size]
        args += extra + ["--no-progress"]
        r.run(cli + ["convert_imageset"] + args, shown="resnet-imagenet convert_imageset " + shlex.join(args))

    r.say("\n== 3. compute_image_mean: the BGR mean image of the training LMDB")
    args = ["data/tiny_train_lmdb", "data/tiny_mean.binaryproto", "--no-progress"]
    r.run(cli + ["compute_image_mean"] + args, shown="resnet-imagenet compute_image_mean " + shlex.join(args))

    r.say(f"\n== 4. train the zoo's {NET} on the CPU (prototxts copied to {out}/{tiny})")
    _write_nets(out, cfg, val_images)
    (out / "logs").mkdir()
    train_log = out / "logs" / f"{NET}_{NET}_.log"
    argv, shown = _train_command(NET, cli)
    r.run(argv, shown=shown, log_file=train_log, filter_output=True)
    snaps = _snapshots(out, NET)
    final = snaps[-1].relative_to(out).as_posix()

    r.say("\n== 5. test: every val image once, top-1 / top-5 / loss")
    args = ["--model", f"{tiny}/train_val.prototxt", "--weights", final]
    res.top1_before = _top1(r.run(cli + ["test"] + args, shown="resnet-imagenet test " + shlex.join(args)))

    r.say("\n== 6. prune 2x (LASSO channel selection + least squares), test, fine-tune briefly, test again")
    pruned_dir = f"prototxt_like/{NET}_2x"
    args = ["--model", f"{tiny}/train_val.prototxt", "--weights", final, "--data", "data/tiny_train_lmdb",
            "--speedup", "2.0", "--out", pruned_dir]  # fmt: skip
    r.run(cli + ["prune"] + args, shown="resnet-imagenet prune " + shlex.join(args))
    pruned_w = f"{pruned_dir}/{NET}_2x_pruned.caffemodel"
    args = ["--model", f"{pruned_dir}/train_val.prototxt", "--weights", pruned_w]
    res.top1_pruned = _top1(r.run(cli + ["test"] + args, shown="resnet-imagenet test " + shlex.join(args)))
    ft_log = out / "logs" / f"{NET}_2x_{NET}_2x_.log"
    argv, shown = _train_command(f"{NET}_2x", cli, ["--weights", pruned_w])
    r.run(argv, shown=shown, log_file=ft_log, filter_output=True)
    ft_snaps = _snapshots(out, f"{NET}_2x")
    args = ["--model", f"{pruned_dir}/train_val.prototxt", "--weights", ft_snaps[-1].relative_to(out).as_posix()]
    res.top1_after = _top1(r.run(cli + ["test"] + args, shown="resnet-imagenet test " + shlex.join(args)))

    r.say("\n== 7. classify a few val images with the deploy net")
    imgs = sorted((out / "images" / "val").glob(f"*/*_{0:04d}.jpg"))[: cfg.classify_count]
    args = ["--model", f"{tiny}/deploy.prototxt", "--weights", final, "--mean", "data/tiny_mean.binaryproto",
            "--labels", "data/tiny_train_lmdb.classes.txt"] + [p.relative_to(out).as_posix() for p in imgs]  # fmt: skip
    r.run(cli + ["classify"] + args, shown="resnet-imagenet classify " + shlex.join(args))

    r.say("\n== 8. the training log as CSV rows and a loss curve")
    log_rel = train_log.relative_to(out).as_posix()
    r.run(cli + ["parse_log", log_rel, "logs"], shown=f"resnet-imagenet parse_log {log_rel} logs")
    r.run(
        cli + ["plot_log", log_rel, "-o", "loss_curve.png"],
        shown=f"resnet-imagenet plot_log {log_rel} -o loss_curve.png",
    )

    res.seconds = time.time() - t0
    res.outputs = {
        "dataset": f"{out}/images/{{train,val}}/<class>/*.jpg",
        "LMDBs": f"{out}/data/tiny_{{train,val}}_lmdb (class list: tiny_train_lmdb.classes.txt)",
        "mean": f"{out}/data/tiny_mean.binaryproto",
        "nets": f"{out}/{tiny}/{{train_val,deploy,{NET}_solver}}.prototxt",
        "snapshots": ", ".join(f"{out}/{p.relative_to(out)}" for p in snaps) + " (+ .solverstate)",
        "pruned 2x": f"{out}/{pruned_dir}/ (prune_report.json, {NET}_2x_pruned.caffemodel; fine-tuned: "
        f"{ft_snaps[-1].relative_to(out)})",
        "training log": f"{train_log} (CSV: {train_log.name}.train / .test in {out}/logs)",
        "loss curve": f"{out}/loss_curve.png",
    }
    r.say(f"\n== done in {res.seconds / 60:.1f} min. Outputs:")
    for k, v in res.outputs.items():
        r.say(f"  {k:13s} {v}")
    r.say(
        f"  top-1 on the {val_images} val images: {res.top1_before:.4f} before pruning, {res.top1_pruned:.4f} "
        f"pruned 2x, {res.top1_after:.4f} pruned 2x and fine-tuned"
    )
    return res


# --- the command ---


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out; a rerun replaces it)")
    p.add_argument("--max-iter", type=int, default=None, help="training iterations (default: the zoo solver's)")
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=50)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from resnet_imagenet.tools.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=Path(args.out), max_iter=args.max_iter, train_per_class=args.train_per_class,
                     val_per_class=args.val_per_class)  # fmt: skip
    try:
        run_demo(cfg)
    except RuntimeError as e:
        error_line(f"resnet-imagenet demo: error: {e}")
        return 1
    return 0
