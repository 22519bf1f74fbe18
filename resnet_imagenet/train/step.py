"""One training step's compute: the precision it runs in, and the iter_size passes whose gradients accumulate.

Precision: AMP (autocast in bf16, or in fp16 with torch's GradScaler), channels_last, cudnn.benchmark. On a
GPU, AMP and channels_last are on unless turned off; on the CPU they run only when asked for (``amp_dtype``
bf16 / fp16, ``channels_last=True``): that is how the tests run the GPU's code paths on a machine without one.
DataWait: the seconds the loop spends blocked on the next batch. The loop synchronises with the device once
an iteration (the reduced loss is read on the host), so while it waits the device is idle: the share of
time waited is the GPU's idle share due to the loader (the speed line's ``data wait``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from resnet_imagenet.train.guard import capped_counts

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", *AMP_DTYPES)


def _amp_dtype(device: torch.device, amp: bool, amp_dtype: str) -> torch.dtype | None:
    """``auto``: bf16 where the GPU has it, else fp16; on the CPU none. ``bf16`` / ``fp16``: that, on any device."""
    if amp_dtype not in AMP_CHOICES:
        raise ValueError(f"amp_dtype {amp_dtype!r}: expected one of {', '.join(AMP_CHOICES)}")
    if not amp:
        return None
    cuda = device.type == "cuda"
    if amp_dtype == "auto":
        if not cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp_dtype == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--amp-dtype bf16: {torch.cuda.get_device_name(device)} has no bfloat16 (use fp16)")
    return AMP_DTYPES[amp_dtype]


@dataclass
class Precision:
    """How a step computes: AMP dtype (None: fp32), channels_last, cudnn.benchmark; fp16 carries a GradScaler."""

    device_type: str = "cpu"
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    cudnn_benchmark: bool = False
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def on(
        cls,
        device: torch.device,
        *,
        amp: bool = True,
        amp_dtype: str = "auto",
        channels_last: bool | None = None,
        cudnn_benchmark: bool = True,
    ) -> Precision:
        """The settings asked for on ``device`` (see the module docstring); sets cudnn.benchmark on a GPU.

        ``channels_last`` None: on a GPU, not on the CPU. fp16 gets a GradScaler of the device's type.
        """
        cuda = device.type == "cuda"
        dtype = _amp_dtype(device, amp, amp_dtype)
        if cuda:
            torch.backends.cudnn.benchmark = cudnn_benchmark
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        layout = cuda if channels_last is None else channels_last
        return cls(device.type, dtype, layout, cudnn_benchmark and cuda, scaler)

    @classmethod
    def of(cls, device: torch.device, opts) -> Precision:
        """on() with the amp, amp_dtype, channels_last and cudnn_benchmark of ``opts`` (a TrainOptions)."""
        keys = ("amp", "amp_dtype", "channels_last", "cudnn_benchmark")
        return cls.on(device, **{k: getattr(opts, k) for k in keys})

    def autocast(self) -> contextlib.AbstractContextManager:
        """The AMP context of a forward pass (nothing without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def __str__(self) -> str:
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16 with a gradient scaler"}[self.amp_dtype]
        return f"AMP {amp}, channels_last {self.channels_last}, cudnn.benchmark {self.cudnn_benchmark}"


class DataWait:
    """Seconds spent waiting in ``feeds.next()`` since the last take() (see the module docstring)."""

    def __init__(self) -> None:
        self.waited = 0.0

    def next(self, feeds) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        batch = feeds.next()
        self.waited += time.perf_counter() - t0
        return batch

    def take(self) -> float:
        """The seconds waited since the last take(); starts counting again."""
        waited, self.waited = self.waited, 0.0
        return waited


def forward_backward(trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """iter_size passes of ``trainer``'s model whose gradients accumulate (DDP syncs on the last).

    The forward runs under the precision's autocast; with a GradScaler the loss is scaled before backward
    (the solver unscales, and skips an overflowed update). Returns ([mean loss, items at the loss cap,
    loss items], the last pass's outputs)."""
    net, model, prec, P = trainer.net, trainer.model, trainer.prec, trainer.procs
    iter_size = trainer.sp.iter_size
    net.zero_grad(set_to_none=False)
    loss_sum = torch.zeros((), device=P.device)
    capped = torch.zeros(2, device=P.device)
    for k in range(iter_size):
        sync = k == iter_size - 1 or not P.distributed
        with model.no_sync() if not sync else contextlib.nullcontext():
            batch = trainer.wait.next(trainer.feeds)
            with prec.autocast():
                out = model(**batch)
                loss = net.loss(out)
            if loss.requires_grad:
                (prec.scaler.scale(loss) if prec.scaler is not None else loss).backward()
        loss_sum += loss.detach().float()
        capped += capped_counts(net, P.device)
    return torch.cat([loss_sum.reshape(1) / iter_size, capped]), out


def last_forward(trainer) -> torch.Tensor:
    """caffe: Solve's extra TRAIN forward for the last display (the loss, shape [1]). Unlike Caffe we keep its
    BatchNorm statistics out of the net, so the final test scores the saved snapshot."""
    net = trainer.net
    saved = [b.clone() for b in net.buffers()]
    with torch.no_grad(), trainer.prec.autocast():
        loss = net.loss(trainer.model(**trainer.feeds.next())).reshape(1)
        for b, old in zip(net.buffers(), saved):
            b.copy_(old)
    return loss.float()
