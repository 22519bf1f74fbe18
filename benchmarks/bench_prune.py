"""Channel pruning of ResNet-50: real forward speed-up of the --speedup 2.0 net, and pruning's peak memory.

1. Forward (inference, batch 32) of the zoo's ResNet-50 deploy net against the same net with the
   widths `prune --speedup 2.0` picks, both with random weights; interleaved repetitions, medians,
   ratio = unpruned / pruned time, printed beside the MAC ratio (>= 2.0).
2. `resnet-imagenet prune` run on ResNet-50 (random weights saved as a caffemodel, an LMDB of random
   256x256 JPEGs, --speedup 2.0) in a child process: its peak RSS (features are sampled points, so
   it stays bounded however many images are used).

    python benchmarks/bench_prune.py                    # CPU, batch 32, 5 reps; prune 32 images
    python benchmarks/bench_prune.py --device cuda      # forward timing on the GPU (pruning on CPU)
    python benchmarks/bench_prune.py --quick            # smoke check: batch 2, 1 rep, prune 2 images
3. Deploy (benchmarks/_deploy_timing.py): unpruned vs pruned at batch 32 and 1 in torch eval, torch with
   BatchNorm folded + channels_last, and onnxruntime (the `export` command's file), with Torch-Pruning's
   MAC-halved torchvision resnet50 beside it, and (--layers) a per-layer forward table.

    python benchmarks/bench_prune.py --deploy-only      # only part 3 (needs onnx, onnxruntime, torch-pruning)
    python benchmarks/bench_prune.py --deploy-only --reps 3 --levers --layers --no-torch-pruning
        # the levers, each at >= 2.0x fewer MACs: widths rounded up to multiples of 8 or 16 (prune --round), the
        # residual channels pruned too (prune --residual 0.75, inner widths re-planned), both; per-layer tables
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import lmdb
import numpy as np
import torch

from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.net.cost import count_params_macs
from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto.blob import write_blobproto
from resnet_imagenet.proto.text import read_net
from resnet_imagenet.prune.graph import find_pairs
from resnet_imagenet.prune.plan import keep_width, plan_for_speedup
from resnet_imagenet.prune.residual import find_residual_groups

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "prototxt_like" / "resnet_50"


def _randomize(net) -> None:
    """Random conv/fc weights, unit BatchNorm statistics (a deploy net has no fillers)."""
    with torch.no_grad():
        for m in net.layers.values():
            if hasattr(m, "macs"):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5)
            elif hasattr(m, "scale_factor"):
                m.mean.zero_()
                m.variance.fill_(1.0)
                m.scale_factor.fill_(1.0)
            elif hasattr(m, "view") and m.weight is not None:
                m.weight.fill_(1.0)


def _pruned_deploy(widths: dict[str, int]):
    net_param = read_net(ZOO / "deploy.prototxt")
    for lp in net_param.layer:
        if lp.name in widths:
            lp.convolution_param.num_output = widths[lp.name]
    return load_net(net_param)


def _time_forward(net, x, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        net(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _lever_widths(base, multiple: int = 1, residual: float | None = None) -> dict[str, int]:
    """The widths `prune --speedup 2.0 [--round multiple] [--residual residual]` plans (all num_outputs)."""
    cuts = [(g, keep_width(residual, g.channels, multiple)) for g in find_residual_groups(base)] if residual else []
    widths = plan_for_speedup(base, find_pairs(base), 2.0, multiple=multiple, residual=cuts)[0]
    for g, k in cuts:
        widths.update({name: k for name in g.producers})
    return widths


# onnxruntime runs a conv in NCHWc only when its input channels are a multiple of MLAS's block (8 on this machine;
# onnxruntime/core/optimizer/nchwc_transformer.cc), else in plain NCHW with reorders: hence --round 8 and 16
LEVERS = {
    "pruned-r8": (8, None),
    "pruned-r16": (16, None),
    "pruned-res0.75": (1, 0.75),
    "pruned-res0.75-r8": (8, 0.75),
    "pruned-res0.75-r16": (16, 0.75),
}


def _nets(randomize: bool = True, levers: tuple[str, ...] = ()):
    """The unpruned deploy net and {tag: pruned net} (--speedup 2.0, and the ``levers`` variants of LEVERS)."""
    base = load_net(ZOO / "deploy.prototxt")
    pruned = {"pruned": _pruned_deploy(_lever_widths(base))}
    pruned.update({tag: _pruned_deploy(_lever_widths(base, *LEVERS[tag])) for tag in levers})
    if randomize:
        for net in (base, *pruned.values()):
            _randomize(net)
    macs0 = count_params_macs(base)[1]
    for tag, net in pruned.items():
        print(f"{tag:20s} {macs0 / count_params_macs(net)[1]:.2f}x fewer MACs")
    return base.eval(), {tag: net.eval() for tag, net in pruned.items()}


def bench_forward(batch: int, reps: int, device: torch.device) -> None:
    base, pruned = _nets(randomize=False)
    pruned = pruned["pruned"]
    macs0, macs1 = count_params_macs(base)[1], count_params_macs(pruned)[1]
    for net in (base, pruned):
        _randomize(net)
        net.to(device).eval()
    x = torch.randn(batch, 3, 224, 224, device=device)
    times: dict[str, list[float]] = {"unpruned": [], "pruned": []}
    _time_forward(base, x, device), _time_forward(pruned, x, device)  # warm-up
    for _ in range(reps):
        times["unpruned"].append(_time_forward(base, x, device))
        times["pruned"].append(_time_forward(pruned, x, device))
    t0, t1 = statistics.median(times["unpruned"]), statistics.median(times["pruned"])
    print(f"ResNet-50 forward, batch {batch} on {device}, median of {reps}:")
    print(f"  unpruned {t0 * 1000:.1f} ms  ({macs0 / 1e9:.2f} GMACs/image)")
    print(f"  pruned   {t1 * 1000:.1f} ms  ({macs1 / 1e9:.2f} GMACs/image, {macs0 / macs1:.2f}x fewer MACs)")
    print(f"  real speed-up {t0 / t1:.2f}x")


def _make_inputs(d: Path, images: int) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    env = lmdb.open(str(d / "lmdb"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i in range(images):
            img = cv2.GaussianBlur((rng.random((256, 256, 3)) * 255).astype(np.uint8), (7, 7), 0)
            _, jpg = cv2.imencode(".jpg", img)
            txn.put(b"%08d_%d.jpg" % (i, i), encode_datum(jpg.tobytes(), i % 1000, encoded=True))
    env.close()
    write_blobproto(np.full((1, 3, 224, 224), 115.0, np.float32), d / "mean.binaryproto")
    net = load_net(ZOO / "train_val.prototxt", phase="test", input_shapes={"data": (1, 3, 224, 224), "label": (1,)})
    _randomize(net)
    net.save_caffemodel(d / "random.caffemodel")
    return d / "lmdb", d / "mean.binaryproto", d / "random.caffemodel"


def bench_prune_memory(images: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        data, mean, weights = _make_inputs(d, images)
        cmd = [sys.executable, "-m", "resnet_imagenet", "prune", "--model", str(ZOO / "train_val.prototxt"),
               "--weights", str(weights), "--data", str(data), "--mean", str(mean), "--speedup", "2.0",
               "--images", str(images), "--out", str(d / "resnet_50_2x")]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        wall = time.perf_counter() - t0
        report = json.loads((d / "resnet_50_2x" / "prune_report.json").read_text())
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"prune ResNet-50 --speedup 2.0 on {images} images x 10 points: {wall:.0f} s wall, "
          f"peak RSS {child:.0f} MB (while pruning, before export: {report['peak_rss_mb']:.0f} MB), "
          f"{report['speedup']:.2f}x fewer MACs")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each (after one warm-up)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the forward timing")
    ap.add_argument("--images", type=int, default=32, help="images the pruning run samples")
    ap.add_argument("--quick", action="store_true", help="smoke check: batch 2, 1 rep, 2 images")
    ap.add_argument("--deploy-only", action="store_true", help="only the deploy comparison (part 3)")
    ap.add_argument("--no-torch-pruning", action="store_true", help="leave Torch-Pruning out of part 3")
    ap.add_argument("--layers", action="store_true", help="part 3: also per-layer tables (torch and onnxruntime)")
    ap.add_argument("--batches", default="32,1", help="part 3: batch sizes, comma-separated (default 32,1)")
    ap.add_argument(
        "--levers",
        nargs="?",
        const=",".join(LEVERS),
        default="",
        help=f"part 3: also these variants, comma-separated (alone: all of {', '.join(LEVERS)})",
    )
    args, unknown = ap.parse_known_args()
    if unknown:
        print(f"bench_prune: ignoring {' '.join(unknown)}")
    if args.quick:
        args.batch, args.reps, args.images = 2, 1, 2
    if not args.deploy_only:
        bench_forward(args.batch, args.reps, torch.device(args.device))
        bench_prune_memory(args.images)
    from _deploy_timing import bench_deploy

    batches = (2, 1) if args.quick else tuple(int(b) for b in args.batches.split(","))
    levers = tuple(t for t in args.levers.split(",") if t)
    unknown = [t for t in levers if t not in LEVERS]
    if unknown:
        ap.error(f"--levers: unknown {', '.join(unknown)} (known: {', '.join(LEVERS)})")
    bench_deploy(*_nets(levers=levers), batches, args.reps, not args.no_torch_pruning, args.layers)


if __name__ == "__main__":
    main()
