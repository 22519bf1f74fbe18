"""``resnet-imagenet prune``: load a net + weights, sample images (read by the caller), prune, write the folder.

The folder (written completely or not at all) holds train_val.prototxt and deploy.prototxt with the
reduced num_output (plain layers only, unless --filter-input adds caffe-pro Filter layers in front of
each branch2a), <dir>_pruned.caffemodel, a fine-tune <dir>_solver.prototxt
and prune_report.json. Every check on the input (weights matching the net, a reachable speed-up,
a readable non-empty database) runs before anything is written. The images arrive as a tensor from the
caller's ImageSource (tools/prune.py reads them with data/'s DataFeed): prune does not import data/.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from resnet_imagenet.net.cost import count_params_macs
from resnet_imagenet.net.deploy import deploy_from
from resnet_imagenet.net.net import CaffeNet, load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import read_binary_proto
from resnet_imagenet.proto.text import read_net, read_solver, to_text
from resnet_imagenet.prune.core import LayerReport, prune_net
from resnet_imagenet.prune.filter import export_filters
from resnet_imagenet.prune.graph import find_pairs
from resnet_imagenet.prune.options import plan_widths, residual_plan
from resnet_imagenet.prune.plan import planned_macs
from resnet_imagenet.prune.residual import apply_residual, residual_keeps
from resnet_imagenet.util.atomic import atomic_path

log = logging.getLogger(__name__)

# Fine-tune recipe relative to the net's own training solver (the zoo's <net>_solver.prototxt beside
# --model): 1/10 of its base_lr (ResNet-50: 0.01, the second rate of the original schedule), 1/4 of its
# iterations (ResNet-50: 200,000 = 20 epochs at 4 GPUs x 32), one step down by 0.1 halfway. On the demo's
# tiny net this recovered more than the released model's 1e-5 or 1/100 of base_lr did (see BENCHMARKS.md).
FINETUNE_LR_DIVISOR = 10
FINETUNE_ITER_DIVISOR = 4


def check_weights(net: CaffeNet, weights: str | os.PathLike) -> None:
    """Load ``weights`` into ``net``; every layer with blobs must get them (else a clear error)."""
    net.load_caffemodel(weights)
    src = read_binary_proto(weights, caffe_pb2.NetParameter(), "caffemodel")
    have = {lp.name for lp in src.layer if lp.blobs}
    missing = [lp.name for lp in net.layer_params if net.layers[lp.name].blobs() and lp.name not in have]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{weights}: no weights for layer(s) {', '.join(missing[:5])}{more}; is it this net's caffemodel?"
        )


def finetune_solver(out: Path, model: Path) -> caffe_pb2.SolverParameter:
    """The fine-tune solver, scaled from the training solver beside ``model`` (ImageNet ResNet-50's if none)."""
    base = model.parent / f"{model.parent.name}_solver.prototxt"
    if base.is_file():
        s = read_solver(base)
        s.ClearField("net")
    else:
        s = caffe_pb2.SolverParameter(type="SGD", lr_policy="step", gamma=0.1, momentum=0.9, weight_decay=0.0001)
        s.test_iter.append(1000)
        s.test_interval, s.base_lr, s.max_iter, s.display, s.snapshot = 10000, 0.1, 800000, 20, 50000
    s.net = str(out / "train_val.prototxt")
    s.base_lr = s.base_lr / FINETUNE_LR_DIVISOR
    s.max_iter = max(1, s.max_iter // FINETUNE_ITER_DIVISOR)
    s.lr_policy, s.stepsize, s.gamma = "step", max(1, s.max_iter // 2), 0.1
    s.ClearField("stepvalue")
    s.snapshot = min(s.snapshot or s.max_iter, max(1, s.max_iter // 4))
    s.test_interval = min(s.test_interval or s.max_iter, s.max_iter)
    s.snapshot_prefix = f"snapshots/{out.name}"
    return s


ImageSource = Callable[[caffe_pb2.LayerParameter, int, int], torch.Tensor]
"""(the net's TEST data layer, n, seed) -> up to n images through that layer's transform (a seeded subset)."""


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: exists and is not empty (pass --force to replace it)")


def _load(model: Path, weights: str | os.PathLike) -> tuple[caffe_pb2.NetParameter, CaffeNet]:
    """The train_val as read, and its TEST net with ``weights``, which must have a Data/ImageData layer."""
    full = read_net(model)
    net = load_net(full, phase="test")
    if not net.data_layers or net.data_layers[0].type not in ("Data", "ImageData"):
        raise ValueError(
            f"{model}: no TEST Data/ImageData layer; give the train_val prototxt (its transform reads --data)"
        )
    check_weights(net, weights)
    return full, net


def _check_args(
    speedup: float | None,
    widths: str | None,
    images: int,
    points: int,
    round_to: int,
    residual: float | None,
    filter_input: bool,
) -> None:
    """run's flag checks, before anything is read."""
    if (speedup is None) == (widths is None):
        raise ValueError("give exactly one of --speedup or --widths")
    if images < 1 or points < 1:
        raise ValueError("--images and --points-per-image must be positive")
    if round_to < 1:
        raise ValueError(f"--round {round_to}: must be a positive number of channels")
    if residual is not None and filter_input:
        raise ValueError("--residual and --filter-input both prune the block inputs: give one of them")


def run(
    model: str | os.PathLike,
    weights: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sample: ImageSource,
    speedup: float | None = None,
    widths: str | None = None,
    method: str = "lasso",
    images: int = 500,
    points: int = 10,
    seed: int = 0,
    batch: int = 16,
    device: str = "cpu",
    force: bool = False,
    filter_input: bool = False,
    round_to: int = 1,
    residual: float | None = None,
) -> dict:
    """Prune ``model`` with ``weights`` and write the folder ``out``; returns the report.

    ``sample`` reads ``images`` images of ``data`` (named in the report) once every other check has passed.
    ``filter_input``: also prune the block input each branch2a reads, through a Filter layer in front of it
    (the released ResNet-50-2X's channel sampler): widths from --widths' Filter layers, or with --speedup
    the same keep ratio as the inner widths (counted in the multiply-adds).
    ``round_to``: every kept width a multiple of it (rounded up; a layer narrower than it keeps its width).
    ``residual``: also prune the residual channels (prune/residual.py), one mask per stage keeping this
    ratio of them; with --speedup the inner widths are planned with these counted.
    """
    out, model = Path(out), Path(model)
    _check_args(speedup, widths, images, points, round_to, residual, filter_input)
    _check_out(out, force)
    full, net = _load(model, weights)
    net.to(device)
    pairs = find_pairs(net)
    cuts = residual_plan(net, residual, round_to)
    keep, filters, applied = plan_widths(net, pairs, speedup, widths, filter_input, round_to, cuts)
    x = sample(net.data_layers[0], images, seed).to(device)
    log.info("sampled %d images of %s; pruning %d conv pairs by %s", len(x), data, len(keep), method)
    pruned, reports = prune_net(net, x, keep, method=method, points=points, batch=batch, seed=seed, filters=applied)
    if cuts:
        kept = residual_keeps(net, cuts, (x[s : s + batch] for s in range(0, len(x), batch)))
        pruned = apply_residual(pruned, kept)
        log.info("residual channels: %s", ", ".join(f"{g.channels} -> {len(k)}" for g, k in kept))
    head = {
        "model": str(model),
        "weights": str(weights),
        "data": str(data),
        "method": method,
        "widths": widths or f"speedup {speedup:g}",
        "images": len(x),
        "points_per_image": points,
        "round": round_to,
        "residual": residual,
    }
    released = planned_macs(net, pairs, keep, filters) if filters else None
    report = _report(head, reports, net, pruned, speedup, filter_input, released)
    report["residual_groups"] = [
        {"producers": g.producers, "consumers": g.consumers, "channels_before": g.channels, "channels_after": k}
        for g, k in cuts
    ]
    report["peak_rss_mb"] = _peak_rss_mb()  # of this process so far: loading, sampling, pruning
    export(out, full, pruned, report, x[: min(4, len(x))], model)
    return report


def _report(
    head: dict,
    reports: list[LayerReport],
    net: CaffeNet,
    pruned: CaffeNet,
    speedup: float | None,
    filter_input: bool,
    released: int | None,
) -> dict:
    """The report's fields in their file order: ``head`` (what was pruned how), the layers, the totals;
    ``released``: the MACs with the input Filters --widths names (the released model's count)."""
    (params0, macs0), (params1, macs1) = count_params_macs(net), count_params_macs(pruned)
    report = {
        **head,
        "layers": [asdict(r) for r in reports],
        "params_before": params0,
        "params_after": params1,
        "macs_before": macs0,
        "macs_after": macs1,
        "speedup": macs0 / macs1,
        "requested_speedup": speedup,
        "filter_input": filter_input,
    }
    if released is not None:
        report["released"] = {"macs_with_input_filters": released, "speedup_with_input_filters": macs0 / released}
    return report


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024  # bytes on macOS, KiB on Linux


def export(out: Path, full: caffe_pb2.NetParameter, pruned: CaffeNet, report: dict, x: torch.Tensor, model: Path):
    """Write the folder; the written net is reloaded and must reproduce the in-memory pruned net."""
    widths = {lp.name: lp.convolution_param.num_output for lp in pruned.layer_params if lp.type == "Convolution"}
    tv = caffe_pb2.NetParameter()
    tv.CopyFrom(full)
    for lp in tv.layer:
        if lp.type == "Convolution" and lp.name in widths:
            lp.convolution_param.num_output = widths[lp.name]
    export_filters(tv, pruned)
    header = f"# Channel-pruned by resnet-imagenet prune ({report['method']}, {report['widths']}) from {model}\n"
    deploy = deploy_from(tv, (1, *pruned.input_shapes[pruned.input_names[0]][1:]))
    name = out.name
    caffemodel = f"{name}_pruned.caffemodel"
    files = {"train_val": "train_val.prototxt", "deploy": "deploy.prototxt", "weights": caffemodel}
    report["files"] = {**files, "solver": f"{name}_solver.prototxt"}
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "train_val.prototxt").write_text(header + to_text(tv))
        (tmp / "deploy.prototxt").write_text(header + to_text(deploy))
        pruned.cpu().save_caffemodel(tmp / caffemodel)
        (tmp / f"{name}_solver.prototxt").write_text(to_text(finetune_solver(out, model)))
        check = load_net(tmp / "deploy.prototxt", weights=tmp / caffemodel)
        load_net(tmp / "train_val.prototxt", weights=tmp / caffemodel, phase="train")  # TRAIN phase builds too
        logits = deploy.layer[-1].bottom[0] if deploy.layer[-1].name == "prob" else check.output_names[0]
        x = x.cpu()
        with torch.no_grad():
            extra = {n: torch.zeros(len(x)) for n in pruned.input_names[1:]}
            want = pruned(x, **extra, blobs=[logits])[logits]
            got = check(x, blobs=[logits])[logits]
        diff = float((want - got).abs().max())
        if diff > 1e-4 * max(1.0, float(want.abs().max())):
            raise RuntimeError(f"the exported net differs from the pruned net by {diff:g} at '{logits}'")
        (tmp / "prune_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_report(report: dict) -> str:
    """The per-layer table and totals, as the command prints them."""
    rows = [f"{'layer':<22} {'next':<22} {'channels':>13} {'rel. error':>10}"]
    for r in report["layers"]:
        ch = f"{r['channels_before']} -> {r['channels_after']}"
        rows.append(f"{r['layer']:<22} {r['next']:<22} {ch:>13} {r['rel_error']:>10.4f}")
    for g in report.get("residual_groups", []):
        ch = f"{g['channels_before']} -> {g['channels_after']}"
        rows.append(f"{'residual ' + g['producers'][0]:<22} {'(' + str(len(g['producers'])) + ' convs)':<22} {ch:>13}")
    rows.append(f"params  {report['params_before']:,} -> {report['params_after']:,}")
    rows.append(
        f"MACs    {report['macs_before'] / 1e9:.3f} G -> {report['macs_after'] / 1e9:.3f} G per image: "
        f"{report['speedup']:.2f}x fewer multiply-adds"
    )
    if "released" in report:
        rel = report["released"]
        rows.append(
            f"released model (these widths plus its input Filter layers): "
            f"{rel['macs_with_input_filters'] / 1e9:.3f} G, {rel['speedup_with_input_filters']:.2f}x"
        )
    return "\n".join(rows)
