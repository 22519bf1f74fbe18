"""Per-layer forward time of the dense and the pruned ResNet-50, torch (folded) and onnxruntime, side by side.

torch: forward pre/post hooks around each layer of the BatchNorm-folded net (what `time` does), summed over
``reps`` forwards after one warm-up. onnxruntime: its own profiler (SessionOptions.enable_profiling), the
node events of the runs after the first; a node is named by the layer it was exported from (ORT fuses a
conv with its ReLU, and branch2c with the Eltwise sum and ReLU after it: those rows are the conv's).
Rows are summed by role (conv1, branch2a/2b/2c, branch1, fc, the rest: ReLU, Eltwise, Pooling, ORT's
layout reorders) and by stage, to show where the time goes.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch


def torch_layer_ms(net, batch: int, reps: int = 3) -> dict[str, float]:
    """layer -> ms per forward of the folded net (hooks around each layer)."""
    from resnet_imagenet.net.export import deploy_net

    folded = deploy_net(net)
    spent: dict[str, float] = defaultdict(float)
    start: dict[str, float] = {}
    hooks = []
    for name, m in folded.layers.items():
        hooks.append(m.register_forward_pre_hook(lambda _m, _a, n=name: start.__setitem__(n, time.perf_counter())))
        hooks.append(m.register_forward_hook(lambda _m, _a, _o, n=name: spent.__setitem__(
            n, spent[n] + time.perf_counter() - start[n])))  # fmt: skip
    x = torch.randn(batch, *folded.input_shapes[folded.input_names[0]][1:])
    with torch.inference_mode():
        folded(x)
        spent.clear()
        for _ in range(reps):
            folded(x)
    for h in hooks:
        h.remove()
    return {n: 1000 * s / reps for n, s in spent.items()}


def _layer_of(node: str, layers: set[str]) -> str:
    seg = node.split("/")[2] if node.count("/") >= 2 else node
    for cand in (re.sub(r"_relu$", "", seg), seg):  # a conv fused with its ReLU: the conv
        if cand in layers:
            return cand
    return "reorder" if "reorder" in node.lower() else seg


def ort_layer_ms(onnx_path: Path, layers: set[str], batch: int, reps: int, shape=(3, 224, 224)) -> dict[str, float]:
    """layer -> ms per run in onnxruntime's profile (the runs after a warm-up one)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(onnx_path.with_suffix(""))
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: torch.randn(batch, *shape).numpy()}
    for _ in range(reps + 1):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0]:
            out[_layer_of(e["name"], layers)] += e["dur"] / 1000 / reps
    return dict(out)


def role(name: str) -> str:
    for r in ("branch2a", "branch2b", "branch2c", "branch1"):
        if name.endswith(r):
            return r
    return name if name in ("conv1", "fc1000") else "other (ReLU, Eltwise, Pooling, reorders)"


def stage(name: str) -> str:
    return name[:4] if re.match(r"res\d", name) else ("conv1" if name.startswith(("conv1", "pool1")) else "head")


def print_tables(batch: int, cols: dict[str, dict[str, float]], detail: bool) -> None:
    """``cols``: column name -> {layer: ms}; the per-layer rows (``detail``), then sums by role and stage."""
    names = list(cols)
    w = max(12, *(len(c) + 2 for c in names))
    order = list(dict.fromkeys(k for c in cols.values() for k in c))
    head = "".join(f"{c:>{w}s}" for c in names)
    if detail:
        print(f"\nper-layer forward ms, batch {batch}:\n  {'layer':26s}{head}")
        for n in order:
            print(f"  {n:26s}" + "".join(f"{cols[c].get(n, 0.0):{w}.2f}" for c in names))
    for title, key in (("role", role), ("stage", stage)):
        sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for c in names:
            for n, ms in cols[c].items():
                sums[key(n)][c] += ms
        print(f"\nforward ms by {title}, batch {batch}:\n  {title:42s}{head}")
        for k, row in sums.items():
            print(f"  {k:42s}" + "".join(f"{row[c]:{w}.2f}" for c in names))
        print(f"  {'total':42s}" + "".join(f"{sum(cols[c].values()):{w}.2f}" for c in names))
