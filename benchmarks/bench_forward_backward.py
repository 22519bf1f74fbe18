"""Forward+backward of our prototxt-built ResNet-50 against torchvision's resnet50, in one run.

Both do one training step's compute (batch statistics in BatchNorm, softmax loss, backward to
every parameter) on the same input; the two are interleaved, repeated, and the median of each is
compared. Target: ours / torchvision <= 1.05 (BENCHMARKS.md).

    python benchmarks/bench_forward_backward.py                      # batch 32 on CPU, 5 reps
    python benchmarks/bench_forward_backward.py --device cuda --amp --channels-last   # bf16 autocast, NHWC
    python benchmarks/bench_forward_backward.py --amp --amp-dtype fp16 --json fb.json  # the figures as JSON too
    python benchmarks/bench_forward_backward.py --batch 2 --reps 1   # smoke check
    python benchmarks/bench_forward_backward.py --net resnet_tiny --batch 2 --reps 1  # a faster smoke check:
        # another zoo net against torchvision's resnet18 with its class count, at its crop size
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto.text import read_net

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "prototxt_like"


def _step_ours(net, x, y):
    out = net(data=x, label=y)
    loss = sum(w * out[name] for name, w in net.loss_weights.items())
    loss.backward()


def _step_torchvision(model, x, y):
    F.cross_entropy(model(x), y).backward()


def _timed(step, model, x, y, device, amp: torch.dtype | None) -> float:
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        step(model, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _ours(net: str):
    """Our TRAIN net of prototxt_like/NET, its crop size and class count."""
    param = read_net(ZOO / net / "train_val.prototxt")
    size = next(lp.transform_param.crop_size for lp in param.layer if lp.type == "Data")
    classes = [lp.inner_product_param.num_output for lp in param.layer if lp.type == "InnerProduct"][-1]
    return load_net(ZOO / net / "train_val.prototxt", phase="train"), size, classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each (after one warm-up)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--amp", action="store_true", help="autocast in --amp-dtype (as `train` does on a GPU)")
    ap.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"], help="default: bf16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the medians and the setting here")
    ap.add_argument("--net", default="resnet_50", help="a folder of prototxt_like/ (not resnet_50: a smoke check)")
    args = ap.parse_args()

    device = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype] if args.amp else None
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    ours, size, classes = _ours(args.net)
    ours = ours.to(device, memory_format=fmt).train()
    peer = torchvision.models.resnet50 if args.net == "resnet_50" else torchvision.models.resnet18
    theirs = peer(num_classes=classes).to(device, memory_format=fmt).train()
    x = torch.randn(args.batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (args.batch,), device=device)

    times: dict[str, list[float]] = {"ours": [], "torchvision": []}
    runs = {"ours": (_step_ours, ours), "torchvision": (_step_torchvision, theirs)}
    for rep in range(args.reps + 1):  # rep 0 warms up both (allocator, kernels, cudnn autotune)
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]  # alternate who goes first
        for name in order:
            step, model = runs[name]
            t = _timed(step, model, x, y, device, amp)
            if rep:
                times[name].append(t)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = med["ours"] / med["torchvision"]
    setting = (
        f"batch {args.batch}, {device}, threads {torch.get_num_threads()}, amp {args.amp_dtype if amp else 'off'}, "
        f"channels_last {args.channels_last}, reps {args.reps}"
    )
    print(f"forward+backward {args.net} vs torchvision {peer.__name__} ({setting})")
    for name, ts in times.items():
        print(f"  {name:12s} median {med[name]:.4f} s   all: {' '.join(f'{t:.4f}' for t in ts)}")
    print(f"  ratio ours/torchvision = {ratio:.3f}  (target <= 1.05)")
    if args.json:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        result = {"device": name, "setting": setting, "median_s": med, "ratio": ratio, "batch": args.batch}
        result["net"], result["peer"] = args.net, peer.__name__
        result["img_s"] = {k: args.batch / v for k, v in med.items()}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
