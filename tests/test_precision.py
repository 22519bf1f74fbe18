"""The GPU's code paths, run on the CPU (and on a GPU where there is one: the ``cuda`` cases are marked gpu).

bf16 autocast, channels_last, fp16 with torch's GradScaler (scaled loss, unscaled update, skipped on
overflow, its state in the snapshot and back on resume), pinned memory only for a GPU, and the speed
line's data wait. Each trains the real tiny net of a real LMDB through the trainer.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.train import step as S
from resnet_imagenet.train.trainer import Trainer, TrainOptions, train

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)
DEVICES = ["cpu", CUDA]

NET = """name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 8 mirror: true mean_value: 128 scale: 0.0078125 }
  data_param { source: "train_lmdb" batch_size: 8 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""
SOLVER = """net: "net.prototxt"
base_lr: 0.05
lr_policy: "fixed"
momentum: 0.9
max_iter: %(max_iter)d
display: 1
average_loss: 1
snapshot: 4
snapshot_prefix: "snap/tiny"
random_seed: 3
solver_mode: %(mode)s
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """cwd with a 32-record LMDB of 12x12 images in 3 classes; returns a solver writer (max_iter, device)."""
    rng = np.random.default_rng(0)
    env = lmdb.open(str(tmp_path / "train_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(32):
            img = rng.integers(0, 100, (12, 12, 3), dtype=np.uint8)
            img[(i % 3) * 4 : (i % 3) * 4 + 4] += 120
            txn.put(f"{i:08d}".encode(), encode_datum(img, i % 3))
    env.close()
    (tmp_path / "net.prototxt").write_text(NET)
    monkeypatch.chdir(tmp_path)

    def write(max_iter: int = 6, device: str = "cpu", name: str = "solver.prototxt") -> str:
        Path(name).write_text(SOLVER % {"max_iter": max_iter, "mode": "GPU" if device == "cuda" else "CPU"})
        return name

    return write


def run(solver: str, device: str, caplog, **kw) -> tuple[list[float], str]:
    """Train; the loss of every display line, and the whole log."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train(TrainOptions(solver=solver, gpu="0" if device == "cuda" else "cpu", workers=0, **kw)) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    return [float(x) for x in re.findall(r"^Iteration \d+ \(.*\), loss = (\S+)$", text, re.M)], text


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_losses_track_fp32(project, caplog, device):
    fp32, _ = run(project(device=device), device, caplog, amp=False)
    bf16, text = run(project(device=device), device, caplog, amp_dtype="bf16")
    assert "AMP bf16" in text
    assert len(bf16) == len(fp32) == 6
    # bf16 keeps 8 bits of mantissa (~0.4% per rounding): a few iterations stay within 3% of fp32, yet differ
    np.testing.assert_allclose(bf16, fp32, rtol=3e-2)
    assert bf16 != fp32


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_trains_like_nchw(project, caplog, device):
    opts = TrainOptions(solver=project(device=device), gpu="0" if device == "cuda" else "cpu", workers=0, amp=False)
    opts.channels_last, opts.check = True, True
    trainer = Trainer(opts)
    try:
        batch = trainer.feeds.next()
        conv = trainer.net.layers["conv1"].weight
        assert batch["data"].is_contiguous(memory_format=torch.channels_last) and batch["data"].stride()[1] == 1
        assert conv.is_contiguous(memory_format=torch.channels_last) and conv.stride()[1] == 1
    finally:
        trainer.close()
    nchw, _ = run(project(device=device), device, caplog, amp=False, channels_last=False)
    nhwc, text = run(project(device=device), device, caplog, amp=False, channels_last=True)
    assert "AMP off, channels_last True" in text
    # the same arithmetic, other kernels: float rounding only (cuDNN's convolutions may round in TF32)
    np.testing.assert_allclose(nhwc, nchw, rtol=1e-5 if device == "cpu" else 2e-3)


def _trainer(project, device: str, **kw) -> Trainer:
    opts = TrainOptions(solver=project(device=device), gpu="0" if device == "cuda" else "cpu", workers=0, **kw)
    opts.check = True  # the nets, feeds and solver, no processes: the step functions run on it directly
    trainer = Trainer(opts)
    trainer.signals = None
    return trainer


def _grads(trainer: Trainer) -> list[torch.Tensor]:
    return [p.grad.clone() for p in trainer.net.parameters() if p.grad is not None]


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_scaled_step_equals_the_unscaled_step(project, device):
    scaled = _trainer(project, device, amp_dtype="fp16")
    plain = _trainer(project, device, amp_dtype="fp16")
    try:
        assert isinstance(scaled.prec.scaler, torch.amp.GradScaler) and scaled.prec.scaler.is_enabled()
        plain.prec.scaler = None  # the same fp16 autocast, loss not scaled
        plain.net.load_state_dict(scaled.net.state_dict())
        scale = scaled.prec.scaler.get_scale()
        assert scale == 65536.0  # torch's default init_scale
        S.forward_backward(scaled)
        S.forward_backward(plain)
        # backward of the scaled loss: every gradient times the scale (fp16 rounding aside)
        for a, b in zip(_grads(scaled), _grads(plain)):
            torch.testing.assert_close(a / scale, b, rtol=1e-2, atol=1e-5)
        scaled.solver.apply_update(0, scaled.prec.scaler)
        plain.solver.apply_update(0)
        for (_, a), (_, b) in zip(scaled.net.named_parameters(), plain.net.named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
        assert scaled.prec.scaler.get_scale() == scale  # no overflow: the scale stays (growth after 2000 steps)
    finally:
        scaled.close()
        plain.close()


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_inf_gradient_skips_the_update_and_halves_the_scale(project, device):
    trainer = _trainer(project, device, amp_dtype="fp16")
    try:
        before = [p.detach().clone() for p in trainer.net.parameters()]
        S.forward_backward(trainer)
        trainer.net.layers["fc"].weight.grad[0, 0] = float("inf")
        trainer.solver.apply_update(0, trainer.prec.scaler)
        assert len(before) == 6 and all(torch.equal(p, b) for p, b in zip(trainer.net.parameters(), before))
        assert trainer.prec.scaler.get_scale() == 32768.0  # backoff_factor 0.5
        S.forward_backward(trainer)  # the next, finite step goes through
        trainer.solver.apply_update(1, trainer.prec.scaler)
        assert not any(torch.equal(p, b) for p, b in zip(trainer.net.parameters(), before))
    finally:
        trainer.close()


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_resume_equals_the_uninterrupted_run_with_the_scaler_state(project, caplog, device):
    straight, _ = run(project(8, device), device, caplog, amp_dtype="fp16")
    final = Path("snap/tiny_iter_8.caffemodel").read_bytes()
    Path("snap").rename("snap_straight")
    run(project(5, device, "first.prototxt"), device, caplog, amp_dtype="fp16")
    side = torch.load("snap/tiny_iter_5.solverstate.resnet_imagenet.pt", weights_only=True)
    assert side["scaler"]["scale"] == 65536.0 and side["scaler"]["_growth_tracker"] == 5
    resumed, _ = run(project(8, device), device, caplog, amp_dtype="fp16", snapshot="snap/tiny_iter_5.solverstate")
    if device == "cpu":  # iterations 5, 6, 7: the same losses to the last digit, the same weights byte for byte
        assert resumed[-3:] == straight[-3:]
        assert Path("snap/tiny_iter_8.caffemodel").read_bytes() == final
    else:  # cuDNN's kernels (cudnn.benchmark, atomics in backward) are not bitwise repeatable
        np.testing.assert_allclose(resumed[-3:], straight[-3:], rtol=1e-3)
    # the scaler's own state comes back: a scale edited into the sidecar is the resumed trainer's
    side["scaler"]["scale"] = 1024.0
    torch.save(side, "snap/tiny_iter_5.solverstate.resnet_imagenet.pt")
    opts = TrainOptions(solver=project(8, device), gpu="0" if device == "cuda" else "cpu", workers=0, amp_dtype="fp16")
    opts.snapshot = "snap/tiny_iter_5.solverstate"
    trainer = Trainer(opts)
    try:
        trainer.load_state_dict(trainer._resume)
        assert trainer.prec.scaler.get_scale() == 1024.0
        assert trainer.prec.scaler.state_dict()["_growth_tracker"] == 5
    finally:
        trainer.close()


def test_cpu_feeds_neither_pin_nor_copy_asynchronously(project, caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run(project(2), "cpu", caplog)
    trainer = _trainer(project, "cpu")
    try:
        trainer.feeds.next()
        ((feed, _),) = trainer.feeds.feeds
        assert feed._loader.pin_memory is False  # pinning needs a GPU (DataLoader warns and ignores it on the CPU)
    finally:
        trainer.close()
    assert not [w for w in seen if "pin_memory" in str(w.message)]


@pytest.mark.parametrize("device", DEVICES)
def test_speed_line_gives_the_data_wait_share(project, caplog, device):
    _, text = run(project(3, device), device, caplog)
    shares = [
        float(x) for x in re.findall(r"Speed: [\d.]+ images/s \(8 per iteration\), ETA \S+, data wait ([\d.]+)%", text)
    ]
    assert len(shares) == 2 and all(0 < s <= 100 for s in shares)  # iterations 1 and 2 (0 has no rate)


def test_amp_dtype_auto_is_fp32_on_the_cpu_and_a_bad_name_is_an_error():
    cpu = torch.device("cpu")
    assert S.Precision.on(cpu).amp_dtype is None and S.Precision.on(cpu).scaler is None
    assert not S.Precision.on(cpu).channels_last and S.Precision.on(cpu, channels_last=True).channels_last
    assert S.Precision.on(cpu, amp_dtype="bf16", amp=False).amp_dtype is None  # --no-amp wins
    with pytest.raises(ValueError, match="amp_dtype 'fp8': expected one of auto, bf16, fp16"):
        S.Precision.on(cpu, amp_dtype="fp8")
