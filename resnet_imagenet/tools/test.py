"""``test``: Caffe's ``caffe test`` -- the TEST phase of a train_val net over its val LMDB, every output blob.

caffe: tools/caffe.cpp test() -- each iteration runs the TEST net forward and logs ``Batch i, <output> = v`` for
every output blob (those no layer consumes, in name order); at the end it prints ``Loss: <mean total weighted
loss>`` and ``<output> = <mean>`` per output, with `` (* <loss_weight> = <weighted> loss)`` for losses.
With ``iterations`` the means are over that many batches, as Caffe's. Without it (our extra) every image of the
val set is scored exactly once (DataFeed.epoch(); the last batch may be short, and each batch weighs its number
of images, so every image weighs the same). Run under torchrun, each process scores a disjoint share and the
sums are all-reduced, so multi-process results equal single-process ones (no padding, no double counting).
``ten_crop`` (our extra) scores the 4 corner crops and the centre crop, each also mirrored, and averages the 10
softmax outputs (Caffe's python/caffe/classifier.py oversample, the seed's Torch ten-crop loader); each Accuracy
(top_k, ignore_label) and SoftmaxWithLoss output is then computed on the averaged probabilities.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from resnet_imagenet.data.devicetransform import ten_crops
from resnet_imagenet.data.mean import load_mean
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.tools import add_command
from resnet_imagenet.tools._flags import add_allow_missing_weights_flag, add_gpu_flag

log = logging.getLogger(__name__)


def _ten_crop_batches(images: Iterator, batch_size: int, crop: int, mean, scale: float) -> Iterator:
    """Single raw images (1, C, H, W) -> batches of (n, 10, C, crop, crop) crops and (n,) labels."""
    xs, ys = [], []
    for x, y in images:
        xs.append(torch.stack(list(ten_crops(x, crop, mean, scale)), dim=1))
        ys.append(y)
        if len(xs) == batch_size:
            yield torch.cat(xs), torch.cat(ys)
            xs, ys = [], []
    if xs:
        yield torch.cat(xs), torch.cat(ys)


_FLT_MIN = torch.finfo(torch.float32).tiny


@dataclasses.dataclass
class Scores:
    """What ``caffe test`` prints: each output blob's mean (one entry per element, under the blob's name, as
    Caffe prints a non-scalar output), the loss weights, the mean total weighted loss, and the images scored."""

    names: list[str]
    means: list[float]
    loss_weights: dict[str, float]
    loss: float
    images: int

    def __getitem__(self, name: str) -> float:
        """The mean of the (first element of the) output blob ``name``."""
        return self.means[self.names.index(name)]

    def lines(self) -> list[str]:
        """caffe: tools/caffe.cpp test() -- ``Loss: L``, then ``name = mean`` per output entry, with
        `` (* w = w*mean loss)`` for loss outputs (floats as C++ streams print them: 6 significant digits)."""
        out = [f"Loss: {self.loss:.6g}"]
        for name, m in zip(self.names, self.means):
            w = self.loss_weights.get(name, 0.0)
            out.append(f"{name} = {m:.6g}" + (f" (* {w:.6g} = {w * m:.6g} loss)" if w else ""))
        return out


class _Sums:
    """Weighted sums of each output entry and of the total loss, over batches (float64, all-reduced as one)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.names, self.t = device, None, None

    def add(self, names: list[str], values: torch.Tensor, weights: torch.Tensor, loss: float, n: int) -> None:
        if self.names is None:
            self.names = names
            self.t = torch.zeros(2 * len(names) + 2, dtype=torch.float64, device=self.device)
        elif names != self.names:
            raise ValueError(f"the net's outputs changed size between batches ({len(self.names)} -> {len(names)} "
                             "values); outputs that are not scalars need full batches: give --iterations")  # fmt: skip
        k = len(names)
        self.t[:k] += values.double() * weights
        self.t[k : 2 * k] += weights
        self.t[2 * k :] += torch.tensor([loss * n, n], dtype=torch.float64, device=self.device)


def _entries(net, out: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """Output entries in Caffe's order (net outputs sorted by name: Net::Init keeps them in a std::set)."""
    names = sorted(b for b in net.output_names if b in out)
    flats = [out[b].detach().double().flatten() for b in names]
    return [b for b, f in zip(names, flats) for _ in range(f.numel())], torch.cat(flats)


def evaluate(
    model: str | os.PathLike,
    weights: str | os.PathLike | None,
    *,
    iterations: int | None = None,
    gpu: str | None = None,
    ten_crop: bool = False,
    num_workers: int = 2,
    base_dir: str | os.PathLike | None = None,
    on_batch: Callable[[int, list[tuple[str, float]]], None] | None = None,
    allow_missing_weights: bool = False,
) -> Scores:
    """Score the TEST phase of ``model`` with ``weights``: every output blob's mean and the total loss (Scores).

    ``gpu`` is train's ``--gpu`` (cpu, all, or ids: one per process under torchrun); None is the CPU, as
    ``caffe test`` without -gpu. Under torchrun this joins the process group (gloo on CPU, nccl on GPU) and
    leaves it when done, unless the caller had started it. ``on_batch(i, [(output, value), ...])`` is called on
    rank 0 after each of its batches (``caffe test`` logs each batch). A layer with blobs that ``weights``
    does not reach (matched by layer name) is refused unless ``allow_missing_weights``.
    """
    from resnet_imagenet.train import dist as D

    owned = not torch.distributed.is_initialized()
    procs = D.init_procs("cpu" if gpu is None else gpu)
    clean = False
    try:
        result = _evaluate(
            model, weights, procs, iterations, ten_crop, num_workers, base_dir, on_batch, allow_missing_weights
        )
        clean = True
    finally:
        if owned:
            D.close_procs(procs, clean)
    return result


def _test_feed_layer(net, model) -> caffe_pb2.LayerParameter:
    """The TEST phase's one Data or ImageData layer, which must have a label top."""
    feeds = [lp for lp in net.data_layers if lp.type in ("Data", "ImageData")]
    if len(feeds) != 1:
        raise ValueError(f"{model}: the TEST phase needs exactly one Data or ImageData layer, found {len(feeds)}")
    if len(feeds[0].top) < 2:
        raise ValueError(f"{model}: data layer '{feeds[0].name}' has no label top")
    return feeds[0]


def _raw_images_layer(layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
    """``layer`` feeding one whole image per batch, raw pixels: ten_crop applies crops, mean and scale itself."""
    raw = caffe_pb2.LayerParameter()
    raw.CopyFrom(layer)
    raw.transform_param.Clear()
    raw.transform_param.force_color = layer.transform_param.force_color
    raw.transform_param.force_gray = layer.transform_param.force_gray
    # one image per feed batch: images may differ in size (--min_dim 256 LMDBs); crops are batched later
    (raw.data_param if raw.type == "Data" else raw.image_data_param).batch_size = 1
    return raw


def _batches(layer, procs, iterations: int | None, ten_crop: bool, num_workers: int, base: Path):
    """The feed and its (images, labels) batches: every image once, or ``iterations`` batches (Caffe's cycling)."""
    from resnet_imagenet.data.feed import DataFeed

    tp, crop = layer.transform_param, layer.transform_param.crop_size
    batch_size = layer.data_param.batch_size if layer.type == "Data" else layer.image_data_param.batch_size
    feed_layer = _raw_images_layer(layer) if ten_crop else layer
    feed = DataFeed(
        feed_layer,
        "test",
        rank=procs.rank,
        world_size=procs.world_size,
        num_workers=num_workers,
        device=procs.device,
        base_dir=base,
    )
    per_batch = batch_size if ten_crop else 1
    batches = feed.epoch() if iterations is None else (feed.next() for _ in range(iterations * per_batch))
    if ten_crop:
        mean = load_mean(tp, feed.channels, base, layer=layer.name)
        mean = None if mean is None else torch.from_numpy(mean)
        batches = _ten_crop_batches(batches, batch_size, crop, mean, float(tp.scale))
    return feed, batches


def _ten_crop_scores(net, lp_of: dict, x: torch.Tensor, label: torch.Tensor, inputs: tuple[str, str]):
    """Accuracy and SoftmaxWithLoss outputs on the 10 crops' averaged softmax: (entries, values, weights)."""
    n = len(label)
    bottoms = sorted({lp.bottom[0] for lp in lp_of.values()})
    out = net(**{inputs[0]: x.flatten(0, 1), inputs[1]: label.repeat_interleave(10)}, blobs=bottoms)
    names, values, weights = sorted(lp_of), [], []
    for name in names:
        lp = lp_of[name]
        probs = F.softmax(out[lp.bottom[0]].float().flatten(1), dim=1).view(n, 10, -1).mean(1)
        p = lp.accuracy_param if lp.type == "Accuracy" else lp.loss_param
        valid = label != p.ignore_label if p.HasField("ignore_label") else torch.ones_like(label, dtype=torch.bool)
        true = probs.gather(1, torch.where(valid, label, 0).view(-1, 1))
        if lp.type == "Accuracy":  # caffe: accuracy_layer.cpp -- fewer than top_k other scores reach the true one
            per_image = (((probs >= true).sum(1) - 1) < p.top_k).double()
        else:  # caffe: softmax_loss_layer.cpp -- -log(max(p, FLT_MIN))
            per_image = -torch.log(true.squeeze(1).clamp_min(_FLT_MIN)).double()
        count = valid.sum().double()
        values.append((per_image * valid).sum() / count.clamp_min(1))
        weights.append(count)
    return names, torch.stack(values), torch.stack(weights)


def _ten_crop_outputs(net, model) -> dict[str, caffe_pb2.LayerParameter]:
    """Each output blob's Accuracy or SoftmaxWithLoss layer: what --ten-crop can score on averaged crops."""
    lp_of = {}
    for name in net.output_names:
        lp = next((lp for lp in net.layer_params if name in lp.top), None)
        if lp is None or lp.type not in ("Accuracy", "SoftmaxWithLoss") or lp.top[0] != name:
            kind = "a data layer" if lp is None else f"a {lp.type} layer"
            raise ValueError(f"{model}: --ten-crop scores Accuracy and SoftmaxWithLoss outputs; "
                             f"output '{name}' is from {kind}")  # fmt: skip
        lp_of[name] = lp
    return lp_of


def _evaluate(model, weights, procs, iterations, ten_crop, num_workers, base_dir, on_batch, allow_missing) -> Scores:
    from resnet_imagenet.train.setup import load_data_net

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    net = load_data_net(model, weights, "test", base, allow_missing_weights=allow_missing)  # shapes: record 0
    net = net.to(procs.device).eval()
    layer = _test_feed_layer(net, model)
    inputs = (layer.top[0], layer.top[1])
    if ten_crop and not layer.transform_param.crop_size:
        raise ValueError(f"{model}: --ten-crop needs transform_param.crop_size in layer '{layer.name}'")
    lp_of = _ten_crop_outputs(net, model) if ten_crop else {}
    feed, batches = _batches(layer, procs, iterations, ten_crop, num_workers, base)
    sums = _Sums(procs.device)
    with torch.inference_mode():
        for i, (x, label) in enumerate(batches):
            n = len(label)
            if ten_crop:
                names, values, w = _ten_crop_scores(net, lp_of, x, label, inputs)
            else:
                out = net(**dict(zip(inputs, (x, label))))
                names, values = _entries(net, out)
                w = torch.full_like(values, float(n))  # each image weighs the same (a short last batch less)
            loss = sum(net.loss_weights.get(b, 0.0) * float(v) for b, v in zip(names, values))
            sums.add(names, values.to(procs.device), w.to(procs.device), loss, n)
            if procs.rank == 0 and on_batch is not None:
                on_batch(i, list(zip(names, values.tolist())))
    feed.close()
    if sums.t is None:
        raise ValueError(f"{model}: the TEST data of layer '{layer.name}' is empty")
    total = sums.t
    if procs.world_size > 1:
        torch.distributed.all_reduce(total)  # sums over the disjoint shares: every image once
    k = len(sums.names)
    means = (total[:k] / total[k : 2 * k].clamp_min(1e-300)).tolist()
    return Scores(sums.names, means, dict(net.loss_weights), float(total[-2] / total[-1]), int(total[-1]))


# --- the command ---

_EVALUATE = inspect.signature(evaluate).parameters


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "test")
    p.add_argument("--model", required=True, help="train_val prototxt (its TEST-phase data layer names the LMDB)")
    p.add_argument("--weights", required=True, help=".caffemodel")
    add_allow_missing_weights_flag(p, _EVALUATE["allow_missing_weights"].default)
    p.add_argument(
        "--iterations",
        type=int,
        default=_EVALUATE["iterations"].default,
        help="batches to run (default: every image once)",
    )
    add_gpu_flag(p, default="CPU")
    p.add_argument("--ten-crop", action="store_true", help="average 10 crops: 4 corners + centre, each mirrored")
    workers = _EVALUATE["num_workers"].default
    p.add_argument("--workers", type=int, default=workers, help=f"data loader processes (default {workers})")
    p.set_defaults(func=run)


def _log_batch(i: int, values: list[tuple[str, float]]) -> None:
    """caffe: tools/caffe.cpp test() logs ``Batch i, name = value`` per output entry."""
    for name, v in values:
        log.info("Batch %d, %s = %.6g", i, name, v)


def run(args: argparse.Namespace) -> int:
    r = evaluate(
        args.model,
        args.weights,
        iterations=args.iterations,
        gpu=args.gpu,
        ten_crop=args.ten_crop,
        num_workers=args.workers,
        on_batch=_log_batch,
        allow_missing_weights=args.allow_missing_weights,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("Scored %d images%s", r.images, " (10 crops each)" if args.ten_crop else "")
        print("\n".join(r.lines()))
    return 0
