"""time on the zoo nets: per-layer and per-iteration timing (net/timing.py, the time command)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnet_imagenet import cli
from resnet_imagenet.net.cost import summarize
from resnet_imagenet.net.timing import time_net

ZOO = Path(__file__).resolve().parents[1] / "prototxt_like"


@pytest.mark.parametrize(("model", "phase"), [("train_val", "train"), ("deploy", "test")])
def test_time_net_per_layer_and_per_iteration(model: str, phase: str) -> None:
    r = time_net(ZOO / "resnet_tiny" / f"{model}.prototxt", iterations=2, device="cpu", phase=phase, batch=2)
    layers = {name: (fwd, bwd) for name, fwd, bwd in r["layers"]}
    assert list(layers)[:3] == ["conv1", "bn_conv1", "scale_conv1"]
    types = {x.name: x.type for x in summarize(ZOO / "resnet_tiny" / f"{model}.prototxt", phase).layers}
    weighted = [n for n in layers if types[n] in ("Convolution", "InnerProduct")]
    assert len(weighted) == 17 and all(layers[n][0] > 0 and layers[n][1] > 0 for n in weighted)
    # Layer times are taken inside the timed passes, so they add up to no more than the passes.
    assert 0 < sum(f for f, _ in layers.values()) <= r["forward_ms"]
    assert 0 < sum(b for _, b in layers.values()) <= r["backward_ms"]
    assert r["forward_backward_ms"] >= r["forward_ms"] + r["backward_ms"]


def test_time_command_refuses_a_missing_gpu(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    model = str(ZOO / "resnet_tiny" / "deploy.prototxt")
    assert cli.main(["time", "--model", model, "--gpu", "0", "--iterations", "1"]) == 1
    assert "GPU 0 does not exist (0 GPUs visible)" in capsys.readouterr().err  # the --gpu flag's one-line error


def test_time_command_runs_on_the_cpu_by_name(capsys) -> None:
    model = str(ZOO / "resnet_tiny" / "deploy.prototxt")
    assert cli.main(["time", "--model", model, "--gpu", "cpu", "--iterations", "1", "--phase", "test"]) == 0
    assert "Testing for 1 iterations." in capsys.readouterr().err
