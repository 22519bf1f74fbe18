"""parse_log / plot_log on hand-written Caffe-format logs and on the published resnet_32 training log."""

from __future__ import annotations

import csv
import math

import pytest

from resnet_imagenet import cli
from resnet_imagenet.tools.logs import moving_average, plot_log, training_loss
from resnet_imagenet.util.caffelog import parse_log, parse_log_text

# Caffe's exact line formats (solver.cpp / sgd_solver.cpp of BVLC master), with a test pass at 0 and 200.
SNIPPET = """\
Log file created at: 2017/12/31 23:58:00
I1231 23:58:59.500000 1234 caffe.cpp:217] Using GPUs 0
I1231 23:59:00.000000 1234 solver.cpp:48] Initializing solver from parameters:
base_lr: 0.1
I1231 23:59:01.250000 1234 solver.cpp:337] Iteration 0, Testing net (#0)
I1231 23:59:02.000000 1234 solver.cpp:404]     Test net output #0: accuracy@1 = 0.001
I1231 23:59:02.000001 1234 solver.cpp:404]     Test net output #1: accuracy@5 = 0.005
I1231 23:59:02.000002 1234 solver.cpp:404]     Test net output #2: loss = 6.9 (* 1 = 6.9 loss)
I1231 23:59:03.000000 1234 solver.cpp:228] Iteration 0 (0 iter/s, 1.5s/100 iters), loss = 6.95
I1231 23:59:03.000010 1234 solver.cpp:244]     Train net output #0: loss = 6.95 (* 1 = 6.95 loss)
I1231 23:59:03.000020 1234 sgd_solver.cpp:106] Iteration 0, lr = 0.1
I1231 23:59:53.000000 1234 solver.cpp:228] Iteration 100 (2 iter/s, 50s/100 iters), loss = 5.5
I1231 23:59:53.000100 1234 solver.cpp:244]     Train net output #0: loss = 5.25 (* 1 = 5.25 loss)
I1231 23:59:53.000200 1234 sgd_solver.cpp:106] Iteration 100, lr = 0.1
I0101 00:00:43.000000 1234 solver.cpp:337] Iteration 200, Testing net (#0)
W0101 00:00:44.000000 1234 data_layer.cpp:73] Restarting data prefetching from start.
I0101 00:00:44.500000 1234 solver.cpp:404]     Test net output #0: accuracy@1 = 0.25
I0101 00:00:44.500001 1234 solver.cpp:404]     Test net output #1: accuracy@5 = 0.625
I0101 00:00:44.500002 1234 solver.cpp:404]     Test net output #2: loss = 3.5 (* 1 = 3.5 loss)
I0101 00:00:45.000000 1234 solver.cpp:228] Iteration 200 (2 iter/s, 50s/100 iters), loss = 4.125
I0101 00:00:45.000001 1234 solver.cpp:244]     Train net output #0: loss = 4 (* 1 = 4 loss)
I0101 00:00:45.000002 1234 sgd_solver.cpp:106] Iteration 200, lr = 0.01
I0101 00:00:46.000000 1234 solver.cpp:454] Snapshotting to binary proto file snapshots/x_iter_200.caffemodel
"""

REAL_LOG = "resnet-imagenet-caffe/resnet_32/logs/resnet_32_resnet_32__2017-01-11_18-29-29.log"


def test_snippet_rows_exact() -> None:
    parsed = parse_log_text(SNIPPET, year=2017)
    # Seconds count from the first time-stamped line (23:58:59.5) and go on across the new year.
    assert parsed.train == [
        {"NumIters": 0, "Seconds": 3.50001, "LearningRate": 0.1, "SmoothedLoss": 6.95, "loss": 6.95},
        {"NumIters": 100, "Seconds": 53.5001, "LearningRate": 0.1, "SmoothedLoss": 5.5, "loss": 5.25},
        {"NumIters": 200, "Seconds": 105.500001, "LearningRate": 0.01, "SmoothedLoss": 4.125, "loss": 4.0},
    ]
    assert parsed.test == [
        {"NumIters": 0, "Seconds": 2.5, "LearningRate": 0.1, "accuracy@1": 0.001, "accuracy@5": 0.005, "loss": 6.9},
        {"NumIters": 200, "Seconds": 105.0, "LearningRate": 0.01, "accuracy@1": 0.25, "accuracy@5": 0.625,
         "loss": 3.5},
    ]  # fmt: skip
    assert parsed.loss_weights == {"loss": 1.0}
    assert training_loss(parsed) == ([0, 100, 200], [6.95, 5.25, 4.0])


def test_old_caffe_format_and_weighted_losses() -> None:
    text = (
        "I0301 10:00:00.000000 1 solver.cpp:228] Iteration 20, loss = 3\n"
        "I0301 10:00:00.000000 1 solver.cpp:244]     Train net output #0: loss1 = 2 (* 0.5 = 1 loss)\n"
        "I0301 10:00:00.000000 1 solver.cpp:244]     Train net output #1: loss2 = 2 (* 1 = 2 loss)\n"
        "I0301 10:00:00.000000 1 solver.cpp:244]     Train net output #2: acc = 0.5\n"
        "I0301 10:00:01.000000 1 sgd_solver.cpp:106] Iteration 20, lr = 1e-05\n"
    )
    parsed = parse_log_text(text, year=2020)
    assert parsed.train == [
        {"NumIters": 20, "Seconds": 0.0, "LearningRate": 1e-05, "SmoothedLoss": 3.0, "loss1": 2.0, "loss2": 2.0,
         "acc": 0.5}
    ]  # fmt: skip
    assert training_loss(parsed) == ([20], [3.0])  # 0.5 * 2 + 1 * 2


def test_year_from_file_name_handles_leap_day(tmp_path) -> None:
    text = (
        "I0228 23:00:00.000000 1 solver.cpp:228] Iteration 0, loss = 1\n"
        "I0228 23:00:00.000000 1 solver.cpp:244]     Train net output #0: loss = 1 (* 1 = 1 loss)\n"
        "I0301 01:00:00.000000 1 solver.cpp:228] Iteration 10, loss = 1\n"
        "I0301 01:00:00.000000 1 solver.cpp:244]     Train net output #0: loss = 1 (* 1 = 1 loss)\n"
    )
    leap, plain = tmp_path / "net_2016-02-28_23-00-00.log", tmp_path / "net_2017-02-28_23-00-00.log"
    leap.write_text(text)
    plain.write_text(text)
    assert [r["Seconds"] for r in parse_log(leap).train] == [0.0, 26 * 3600.0]
    assert [r["Seconds"] for r in parse_log(plain).train] == [0.0, 2 * 3600.0]


def test_parse_log_cli_writes_csvs(tmp_path, capsys) -> None:
    log_path = tmp_path / "train.log"
    log_path.write_text(SNIPPET)
    out = tmp_path / "csv"
    assert cli.main(["parse_log", str(log_path), str(out)]) == 0
    with open(out / "train.log.train") as f:
        train = list(csv.reader(f))
    with open(out / "train.log.test") as f:
        test = list(csv.reader(f))
    assert train[0] == ["NumIters", "Seconds", "LearningRate", "SmoothedLoss", "loss"]
    assert train[3] == ["200", "105.500001", "0.01", "4.125", "4.0"]
    assert test == [
        ["NumIters", "Seconds", "LearningRate", "accuracy@1", "accuracy@5", "loss"],
        ["0", "2.5", "0.1", "0.001", "0.005", "6.9"],
        ["200", "105.0", "0.01", "0.25", "0.625", "3.5"],
    ]
    assert "3 rows" in capsys.readouterr().out


def test_real_caffe_log(reference_dir, tmp_path) -> None:
    parsed = parse_log(reference_dir / REAL_LOG)
    assert len(parsed.train) == 800 and parsed.test == []  # display 1000, max_iter 800000, no test net
    first, last = parsed.train[0], parsed.train[-1]
    # I0111 18:29:29.948931 is the first stamped line; iteration 0's outputs start at 18:29:39.714249.
    assert first == {"NumIters": 0, "Seconds": pytest.approx(9.765318), "LearningRate": 0.1,
                     "SmoothedLoss": 7.16275, "accuracy@1": 0.0, "accuracy@5": 0.03125, "prob": 7.16275}  # fmt: skip
    # I0116 16:35:09.430521: 4 days 22:05:39.48159 later; lr stepped by gamma 0.1 three times.
    assert last == {"NumIters": 799000, "Seconds": pytest.approx(425139.48159), "LearningRate": pytest.approx(1e-4),
                    "SmoothedLoss": 0.456989, "accuracy@1": 0.84375, "accuracy@5": 1.0, "prob": 0.412819}  # fmt: skip
    lrs = {r["NumIters"]: r["LearningRate"] for r in parsed.train}
    assert lrs[199000] == 0.1 and lrs[200000] == pytest.approx(0.01)  # stepsize 200000
    assert parsed.loss_weights == {"prob": 1.0}


def test_plot_log_real_and_snippet(reference_dir, tmp_path) -> None:
    png = tmp_path / "curve.png"
    plot_log(reference_dir / REAL_LOG, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    log_path = tmp_path / "ours.log"
    log_path.write_text(SNIPPET)
    assert cli.main(["plot_log", str(log_path), "-o", str(tmp_path / "c.svg")]) == 0
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:2000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.svg", "curve.png", "ours.log"]  # no temp files left


def test_plot_log_rejects_non_log(tmp_path, capsys) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    assert cli.main(["plot_log", str(bad), "-o", str(tmp_path / "x.png")]) == 1
    assert "no training or test iterations" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_moving_average() -> None:
    assert moving_average([1.0, 3.0, math.nan, 5.0], 2) == [1.0, 2.0, 3.0, 5.0]
