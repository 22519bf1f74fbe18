"""``parse_log`` (Caffe's parse_log.py CSV files, util/caffelog.py) and ``plot_log`` of Caffe-format training logs."""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
from pathlib import Path

from resnet_imagenet.tools import add_command
from resnet_imagenet.util.atomic import atomic_path
from resnet_imagenet.util.caffelog import BASE_COLUMNS, ParsedLog, columns, parse_log, write_csvs

log = logging.getLogger(__name__)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start); NaNs are skipped."""
    out, buf = [], []
    for v in values:
        buf.append(v)
        if len(buf) > window:
            buf.pop(0)
        ok = [x for x in buf if not math.isnan(x)]
        out.append(sum(ok) / len(ok) if ok else math.nan)
    return out


def training_loss(parsed: ParsedLog) -> tuple[list[int], list[float]]:
    """Iterations and the total training loss at each display: sum of weight * output over loss outputs.

    Falls back to SmoothedLoss when the log shows no weighted outputs.
    """
    names = [n for n, w in parsed.loss_weights.items() if w and not n.startswith("test")]
    train_names = [n for n in names if any(n in r for r in parsed.train)]
    its, losses = [], []
    for row in parsed.train:
        if train_names:
            v = sum(parsed.loss_weights[n] * row.get(n, math.nan) for n in train_names)
        else:
            v = row.get("SmoothedLoss", math.nan)
        its.append(row["NumIters"])
        losses.append(v)
    return its, losses


def _accuracy_names(rows: list[dict]) -> list[str]:
    return [c for c in columns(rows)[len(BASE_COLUMNS) :] if "acc" in c.lower()]


def _smooth_window(displays: int, smooth: int | None) -> int:
    """``smooth``, else n/40 displays (at least 3; no smoothing below 6 displays)."""
    return smooth or (max(3, displays // 40) if displays >= 6 else 1)


def _plot_loss(ax, parsed: ParsedLog, window: int) -> None:
    """Training loss, raw and smoothed, and the test passes' loss outputs."""
    its, loss = training_loss(parsed)
    ax.plot(its, loss, color="tab:blue", alpha=0.35, linewidth=0.8, label="train loss (raw, per display)")
    ax.plot(its, moving_average(loss, window), color="tab:blue", linewidth=2, label=f"smoothed ({window} displays)")
    for name in [c for c in columns(parsed.test)[len(BASE_COLUMNS) :] if c in parsed.loss_weights]:
        rows = [r for r in parsed.test if name in r]
        ax.plot([r["NumIters"] for r in rows], [r[name] for r in rows], "o-", color="tab:red", label=f"test {name}")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")


def _plot_accuracy(ax, parsed: ParsedLog, window: int) -> None:
    """Test accuracies; without test passes, the training batches' accuracies, smoothed."""
    if parsed.test and _accuracy_names(parsed.test):
        for name in _accuracy_names(parsed.test):
            rows = [r for r in parsed.test if name in r]
            ax.plot([r["NumIters"] for r in rows], [r[name] for r in rows], "o-", label=f"test {name}")
        ax.set_ylabel("test accuracy")
    else:
        its = [r["NumIters"] for r in parsed.train]
        for name in _accuracy_names(parsed.train):
            vals = [r.get(name, math.nan) for r in parsed.train]
            ax.plot(its, moving_average(vals, window), label=f"train {name} (batch, smoothed)")
        ax.set_ylabel("train accuracy (no test passes in log)")
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower right")


def plot_log(path: str | os.PathLike, out: str | os.PathLike, *, smooth: int | None = None) -> Path:
    """Plot training loss (raw and smoothed) and accuracy against iteration; write the image atomically.

    ``smooth`` is the moving-average window in displays (None: n/40, at least 3). Accuracy comes from the
    test rows; a log without test passes (like the published resnet_32 log) shows the training-batch
    accuracies, smoothed, instead.
    """
    from matplotlib.figure import Figure  # Figure + savefig use the Agg canvas; no pyplot global state

    parsed = parse_log(path)
    if not parsed.train and not parsed.test:
        raise ValueError(f"{path}: no training or test iterations found (not a Caffe-format log?)")
    window = _smooth_window(len(parsed.train), smooth)
    fig = Figure(figsize=(9, 7), dpi=100)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    _plot_loss(ax1, parsed, window)
    ax1.set_title(Path(path).name, fontsize=9)
    _plot_accuracy(ax2, parsed, window)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png")
    log.info("wrote %s (%d train rows, %d test rows)", out, len(parsed.train), len(parsed.test))
    return out


# --- the commands ---


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "parse_log")
    p.add_argument("log", help="training log (ours or real Caffe's)")
    outdir = inspect.signature(write_csvs).parameters["outdir"].default
    p.add_argument("outdir", nargs="?", default=outdir, help="folder for the CSVs (default: beside the log)")
    p.set_defaults(func=run_parse_log)

    p = add_command(sub, "plot_log")
    p.add_argument("log", help="training log (ours or real Caffe's)")
    p.add_argument("-o", "--output", required=True, help="image to write (.png, .pdf, .svg)")
    smooth = inspect.signature(plot_log).parameters["smooth"].default
    p.add_argument(
        "--smooth", type=int, default=smooth, help="moving-average window in displays (default: n/40, at least 3)"
    )
    p.set_defaults(func=run_plot_log)


def run_parse_log(args: argparse.Namespace) -> int:
    train_csv, test_csv, parsed = write_csvs(args.log, args.outdir)
    print(f"{train_csv}: {len(parsed.train)} rows")
    print(f"{test_csv}: {len(parsed.test)} rows")
    return 0


def run_plot_log(args: argparse.Namespace) -> int:
    print(plot_log(args.log, args.output, smooth=args.smooth))
    return 0
