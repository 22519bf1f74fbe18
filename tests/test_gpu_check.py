"""benchmarks/gpu_check.sh end to end on the CPU (--dry-run: every step, tiny sizes), and its refusal without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "tests", "lmdb", "prepare", "train_amp", "train_fp32", "time", "fb_amp", "fb_fp32", "prune"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # python3 is this interpreter's
    return {**os.environ, "PATH": path, "OUT": str(tmp_path), "PYTHONPATH": str(REPO), **extra}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without GPUs")
def test_without_a_gpu_it_stops_in_one_line(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "torch.cuda.is_available() is False" in errors[0], r.stderr
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_one_json_with_the_rows(tmp_path):
    r = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], env=_env(tmp_path), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["env"]["device"] == "CPU (dry run)"
    steps = result["steps"]
    assert sorted(steps) == sorted(STEPS) and all(steps[k]["rc"] == 0 for k in STEPS), steps
    assert steps["tests"]["failed"] == 0 and steps["tests"]["skipped"] > 0  # the cuda cases, skipped on the CPU
    for run in ("train_amp", "train_fp32"):
        assert steps[run]["img_s"] > 0 and 0 <= steps[run]["data_wait_pct"] <= 100
    assert steps["train_amp"]["precision"].startswith("AMP bf16, channels_last True")  # the AMP path ran
    assert steps["time"]["fb_ms"] > 0 and steps["fb_amp"]["setting"].count("amp bf16") == 1
    assert steps["prune"]["mac_ratio"] >= 2.0
    rows = "\n".join(result["rows"])
    assert rows in r.stdout  # the BENCHMARKS.md rows, printed
    assert "GPU check on CPU (dry run)" in rows and "| AMP / fp32 |" in rows and "**" in rows
    with tarfile.open(tmp_path / "gpu_check_logs.tar.gz") as tar:  # every step's log comes back too
        names = {Path(n).name for n in tar.getnames()}
    assert {f"{k}.log" for k in STEPS if k != "env"} <= names
    assert not Path(result["work"]).exists()  # the work folder in /tmp is gone
