"""Caffe-format training logs parsed into train/test rows, and Caffe's parse_log.py CSV files written from them.

Reads both our logs and real ``caffe train`` logs: the glog prefix ``I0111 18:29:31.675417 ...`` gives the
time, and the solver lines give iteration, learning rate, loss and every net output. The CSV files are the
ones Caffe's tools/extra/parse_log.py writes (``LOG.train`` and ``LOG.test``, columns NumIters, Seconds,
LearningRate, then one column per net output), plus SmoothedLoss (the solver's ``average_loss`` value).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from resnet_imagenet.util.atomic import atomic_write_text

log = logging.getLogger(__name__)

# glog prefix: severity, MMDD HH:MM:SS.micros (no year: the year comes from the file name or its mtime)
_TIME = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{1,6})\b")
# caffe: solver.cpp -- "Iteration N (x iter/s, ys/K iters), loss = L" (older Caffe: "Iteration N, loss = L")
_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = (\S+)")
# caffe: sgd_solver.cpp -- "Iteration N, lr = LR"
_LR = re.compile(r"Iteration (\d+), lr = (\S+)")
# caffe: solver.cpp -- "Iteration N, Testing net (#K)"
_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
_ITER = re.compile(r"Iteration (\d+)")
# caffe: solver.cpp -- "    Train net output #i: name = v (* w = w*v loss)"; the suffix only for loss blobs
_OUTPUT = re.compile(r"(Train|Test) net output #(\d+): (\S+) = (\S+)(?: \(\* (\S+) = (\S+) loss\))?")
_YEAR_IN_NAME = re.compile(r"((?:19|20)\d\d)-[01]\d-[0-3]\d")

BASE_COLUMNS = ["NumIters", "Seconds", "LearningRate"]


@dataclass
class ParsedLog:
    """Rows of a parsed log. Each row is a dict: NumIters (int), Seconds, LearningRate, outputs (floats)."""

    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    loss_weights: dict[str, float] = field(default_factory=dict)  # output name -> loss weight (loss outputs only)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _stamp(m: re.Match) -> tuple[int, ...]:
    month, day, hour, minute, sec, frac = m.groups()
    return int(month), int(day), int(hour), int(minute), int(sec), int(frac.ljust(6, "0"))


def _resolve_seconds(stamps: list[tuple[int, ...]], year: int | None, path: str | None) -> list[float]:
    """Seconds since the first stamp; the year goes up by one whenever the month goes down (Dec -> Jan)."""
    wraps = sum(1 for a, b in zip(stamps, stamps[1:]) if b[0] < a[0])
    if year is None and path is not None:
        m = _YEAR_IN_NAME.search(os.path.basename(path))
        if m:
            year = int(m.group(1))
        elif os.path.exists(path):
            year = dt.datetime.fromtimestamp(os.path.getmtime(path)).year - wraps  # mtime = end of the log
    if year is None:
        year = dt.date.today().year - wraps
    out: list[float] = []
    start = None
    prev_month = 0
    for month, day, hour, minute, sec, micros in stamps:
        if month < prev_month:
            year += 1
        prev_month = month
        try:
            t = dt.datetime(year, month, day, hour, minute, sec, micros)
        except ValueError:  # Feb 29 in a guessed non-leap year
            t = dt.datetime(year, month, day - 1, hour, minute, sec, micros) + dt.timedelta(days=1)
        start = start or t
        out.append((t - start).total_seconds())
    return out


def parse_log_text(text: str, *, year: int | None = None, path: str | None = None) -> ParsedLog:
    """Parse the text of a Caffe-format log into train and test rows.

    A train row is made per display iteration (from its ``Train net output`` lines, like parse_log.py),
    a test row per ``Testing net`` pass. LearningRate is the ``lr =`` printed for the row's iteration,
    or the latest one before it. Seconds count from the log's first time-stamped line.
    """
    stamps: list[tuple[int, ...]] = []
    result = ParsedLog()
    rows: list[tuple[str, dict, int]] = []  # (kind, row, stamp index) -- Seconds resolved at the end
    iteration = -1
    test_net = 0
    lr = math.nan
    smoothed: tuple[int, float] | None = None
    cur = {"train": None, "test": None}
    for line in text.splitlines():
        m = _TIME.match(line)
        if not m:
            continue  # echoed prototxt, shell lines, tracebacks
        stamps.append(_stamp(m))
        if mt := _TESTING.search(line):
            iteration, test_net = int(mt.group(1)), int(mt.group(2))
            continue
        if ml := _LOSS.search(line):
            iteration = int(ml.group(1))
            smoothed = (iteration, _float(ml.group(2)))
            continue
        if mr := _LR.search(line):
            iteration, lr = int(mr.group(1)), _float(mr.group(2))
            for row in cur.values():  # the lr printed for this iteration belongs to its rows
                if row is not None and row["NumIters"] == iteration:
                    row["LearningRate"] = lr
            continue
        if mi := _ITER.search(line):
            iteration = int(mi.group(1))
        mo = _OUTPUT.search(line)
        if not mo or iteration < 0:
            continue
        kind = "train" if mo.group(1) == "Train" else "test"
        row = cur[kind]
        if row is None or row["NumIters"] != iteration or (kind == "test" and row["_net"] != test_net):
            row = {"NumIters": iteration, "Seconds": math.nan, "LearningRate": lr}
            if kind == "train" and smoothed is not None and smoothed[0] == iteration:
                row["SmoothedLoss"] = smoothed[1]
            row["_net"] = test_net if kind == "test" else 0
            cur[kind] = row
            rows.append((kind, row, len(stamps) - 1))
        name = mo.group(3) if row["_net"] == 0 else f"test{row['_net']}/{mo.group(3)}"
        row[name] = _float(mo.group(4))
        if mo.group(5) is not None:
            result.loss_weights[name] = _float(mo.group(5))
    seconds = _resolve_seconds(stamps, year, path)
    for kind, row, idx in rows:
        row["Seconds"] = seconds[idx]
        del row["_net"]
        getattr(result, kind).append(row)
    return result


def parse_log(path: str | os.PathLike, *, year: int | None = None) -> ParsedLog:
    """Parse a Caffe-format log file (see parse_log_text)."""
    path = str(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return parse_log_text(text, year=year, path=path)


def columns(rows: list[dict]) -> list[str]:
    """BASE_COLUMNS, then every other column of ``rows`` in first-seen order (the CSV header)."""
    cols = list(BASE_COLUMNS)
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def _cell(v) -> str:
    if isinstance(v, int):
        return str(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "" if v is None else "nan"
    return repr(float(v))


def rows_to_csv(rows: list[dict]) -> str:
    """CSV text of ``rows``: a header line, then one line per row (missing values left empty)."""
    cols = columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in rows:
        w.writerow([_cell(row.get(c)) for c in cols])
    return buf.getvalue()


def write_csvs(path: str | os.PathLike, outdir: str | os.PathLike | None = None) -> tuple[Path, Path, ParsedLog]:
    """Write ``LOG.train`` and ``LOG.test`` into ``outdir`` (default: beside the log), as parse_log.py does."""
    parsed = parse_log(path)
    outdir = Path(outdir) if outdir is not None else Path(path).resolve().parent
    base = outdir / Path(path).name
    train_csv, test_csv = Path(f"{base}.train"), Path(f"{base}.test")
    atomic_write_text(train_csv, rows_to_csv(parsed.train))
    atomic_write_text(test_csv, rows_to_csv(parsed.test))
    return train_csv, test_csv, parsed
