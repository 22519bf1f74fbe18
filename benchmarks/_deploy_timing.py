"""The deploy half of bench_prune.py: pruned vs unpruned ResNet-50 as deployed, and Torch-Pruning beside it.

For each batch size, every variant is timed in the same run, interleaved (one forward of each per round),
median of ``reps`` rounds after one warm-up:
  torch eval            the CaffeNet as trained (BatchNorm + Scale run, NCHW)
  torch folded+CL       BatchNorm/Scale folded into the convs (net/fold.py), channels_last memory format
  onnxruntime           the folded net exported by net/export.py (the `export` command), CPU provider
and Torch-Pruning (pip torch-pruning; benchmark only) on torchvision's resnet50, L1 magnitude pruning at the
uniform ratio that halves its MACs (torch channels_last and onnxruntime, as ours).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


def _forward_fn(kind: str, model, batch: int, shape):
    x = torch.randn(batch, *shape)
    if kind == "ort":
        feed = {model.get_inputs()[0].name: x.numpy()}
        return lambda: model.run(None, feed)
    if kind == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return lambda: model(x)


def time_variants(variants: dict, batch: int, reps: int, shape=(3, 224, 224)) -> dict[str, float]:
    """Median seconds per forward of each variant {name: (kind, model)}, interleaved."""
    fns = {name: _forward_fn(kind, model, batch, shape) for name, (kind, model) in variants.items()}
    times: dict[str, list[float]] = defaultdict(list)
    with torch.inference_mode():
        for f in fns.values():
            f()  # warm-up
        for _ in range(reps):
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def ort_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def our_variants(tag: str, net, tmp: Path) -> dict:
    from resnet_imagenet.net.export import DeployModule, deploy_net, export

    folded = DeployModule(deploy_net(net)).eval().to(memory_format=torch.channels_last)
    export(net, "onnx", tmp / f"{tag}.onnx")
    return {
        f"{tag} torch eval": ("nchw", DeployModule(net).eval()),
        f"{tag} torch folded+CL": ("cl", folded),
        f"{tag} onnxruntime": ("ort", ort_session(tmp / f"{tag}.onnx")),
    }


def torch_pruning_variants(tmp: Path, target: float = 2.0) -> tuple[dict, float]:
    """torchvision resnet50 and Torch-Pruning's L1-pruned copy at the ratio giving ``target``x fewer MACs."""
    import torch_pruning as tp
    import torchvision

    base = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    macs0 = tp.utils.count_ops_and_params(base, x)[0]

    def pruned_at(ratio: float):
        m = copy.deepcopy(base)
        pruner = tp.pruner.MagnitudePruner(
            m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio, ignored_layers=[m.fc]
        )
        pruner.step()
        return m, tp.utils.count_ops_and_params(m, x)[0]

    lo, hi = 0.0, 0.9
    for _ in range(8):  # bisection on the (global, uniform) channel ratio
        mid = (lo + hi) / 2
        if macs0 / pruned_at(mid)[1] >= target:
            hi = mid
        else:
            lo = mid
    pruned, macs1 = pruned_at(hi)
    out = {}
    for tag, m in (("tv resnet50", base), ("tv resnet50 Torch-Pruning", pruned)):
        m = m.eval()
        path = tmp / f"{tag.replace(' ', '_')}.onnx"
        torch.onnx.export(m, (x,), str(path), input_names=["data"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"data": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)  # fmt: skip
        out[f"{tag} torch CL"] = ("cl", m.to(memory_format=torch.channels_last))
        out[f"{tag} onnxruntime"] = ("ort", ort_session(path))
    return out, macs0 / macs1


def bench_deploy(base, pruned: dict, batches: tuple[int, ...], reps: int, torch_pruning: bool, layers: bool) -> None:
    """Time ``base`` against each net of ``pruned`` ({tag: net}) in torch and onnxruntime, one run."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        variants = our_variants("unpruned", base, tmp)
        for tag, net in pruned.items():
            variants.update(our_variants(tag, net, tmp))
        ratio = None
        if torch_pruning:
            tpv, ratio = torch_pruning_variants(tmp)
            variants.update(tpv)
        for batch in batches:
            t = time_variants(variants, batch, reps)
            print(
                f"\nResNet-50 deploy forward, batch {batch}, CPU ({torch.get_num_threads()} threads), median of {reps}"
            )
            for name, s in t.items():
                print(f"  {name:40s} {s * 1000:9.1f} ms")
            for tag in pruned:
                for rt in ("torch eval", "torch folded+CL", "onnxruntime"):
                    print(f"  ours speed-up, {tag} ({rt}): {t[f'unpruned {rt}'] / t[f'{tag} {rt}']:.2f}x")
            if ratio is not None:
                for rt in ("torch CL", "onnxruntime"):
                    s = t[f"tv resnet50 {rt}"] / t[f"tv resnet50 Torch-Pruning {rt}"]
                    print(f"  Torch-Pruning speed-up ({rt}, {ratio:.2f}x fewer MACs): {s:.2f}x")
        if layers:
            per_layer(base, pruned, batches, reps, tmp)


def per_layer(base, pruned: dict, batches: tuple[int, ...], reps: int, tmp: Path) -> None:
    """The per-layer table (benchmarks/_layer_timing.py) of every net, torch folded and onnxruntime."""
    from _layer_timing import ort_layer_ms, print_tables, torch_layer_ms

    nets = {"unpruned": base, **pruned}
    names = {lp.name for lp in base.layer_params}
    for batch in batches:
        cols = {}
        for tag, net in nets.items():
            cols[f"{tag} torch"] = torch_layer_ms(net, batch, reps)
        for tag in nets:
            cols[f"{tag} ORT"] = ort_layer_ms(tmp / f"{tag}.onnx", names, batch, reps)
        print_tables(batch, cols, detail=len(nets) <= 2)
