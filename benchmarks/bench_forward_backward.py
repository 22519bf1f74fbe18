"""Forward+backward of our prototxt-built ResNet-50 against torchvision's resnet50, in one run.

Both do one training step's compute (batch statistics in BatchNorm, softmax loss, backward to
every parameter) on the same input; the two are interleaved, repeated, and the median of each is
compared. Target: ours / torchvision <= 1.05 (BENCHMARKS.md).

    python benchmarks/bench_forward_backward.py                      # batch 32 on CPU, 5 reps
    python benchmarks/bench_forward_backward.py --device cuda --amp --channels-last
    python benchmarks/bench_forward_backward.py --batch 2 --reps 1   # smoke check
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from resnet_imagenet.net.net import load_net

REPO = Path(__file__).resolve().parents[1]
TRAIN_VAL = REPO / "prototxt_like" / "resnet_50" / "train_val.prototxt"


def _step_ours(net, x, y):
    out = net(data=x, label=y)
    loss = sum(w * out[name] for name, w in net.loss_weights.items())
    loss.backward()


def _step_torchvision(model, x, y):
    F.cross_entropy(model(x), y).backward()


def _timed(step, model, x, y, device, amp) -> float:
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        step(model, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each (after one warm-up)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--amp", action="store_true", help="float16 autocast (cuda)")
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.amp and device.type != "cuda":
        ap.error("--amp needs --device cuda")
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    ours = load_net(TRAIN_VAL, phase="train").to(device, memory_format=fmt).train()
    theirs = torchvision.models.resnet50().to(device, memory_format=fmt).train()
    x = torch.randn(args.batch, 3, 224, 224, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    times: dict[str, list[float]] = {"ours": [], "torchvision": []}
    runs = {"ours": (_step_ours, ours), "torchvision": (_step_torchvision, theirs)}
    for rep in range(args.reps + 1):  # rep 0 warms up both (allocator, kernels, cudnn autotune)
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]  # alternate who goes first
        for name in order:
            step, model = runs[name]
            t = _timed(step, model, x, y, device, args.amp)
            if rep:
                times[name].append(t)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = med["ours"] / med["torchvision"]
    setting = (
        f"batch {args.batch}, {device}, threads {torch.get_num_threads()}, amp {args.amp}, "
        f"channels_last {args.channels_last}, reps {args.reps}"
    )
    print(f"forward+backward ResNet-50 ({setting})")
    for name, ts in times.items():
        print(f"  {name:12s} median {med[name]:.4f} s   all: {' '.join(f'{t:.4f}' for t in ts)}")
    print(f"  ratio ours/torchvision = {ratio:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
