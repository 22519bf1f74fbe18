"""``test``: Caffe's ``caffe test`` -- the TEST phase of a train_val net over its val LMDB; top-1, top-5, loss.

Without ``iterations`` every image of the val set is scored exactly once (DataFeed.epoch(); the last batch may
be short, and each image weighs the same). Run under torchrun, each process scores a disjoint share and the
sums are all-reduced, so multi-process results equal single-process ones (no padding, no double counting).
``ten_crop`` scores the 4 corner crops and the centre crop, each also mirrored, and averages the 10 softmax
outputs (Caffe's python/caffe/classifier.py oversample, the seed's Torch ten-crop loader).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from resnet_imagenet.data.mean import load_mean
from resnet_imagenet.data.transform import ten_crops
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.tools import add_command
from resnet_imagenet.tools._flags import add_gpu_flag

log = logging.getLogger(__name__)

_CLASSIFIER_INPUTS = ("SoftmaxWithLoss", "Accuracy", "Softmax")


def classifier_blob(net) -> str:
    """The blob of class scores: the first bottom of the net's SoftmaxWithLoss (else Accuracy, else Softmax)."""
    for kind in _CLASSIFIER_INPUTS:
        for lp in net.layer_params:
            if lp.type == kind:
                return lp.bottom[0]
    raise ValueError(f"net '{net.name}' has no SoftmaxWithLoss, Accuracy or Softmax layer to read class scores from")


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


class _Tally:
    """Sums over scored images: correct@1, correct@5, summed loss, count (float64 for exact all-reduce)."""

    def __init__(self, device: torch.device):
        self.t = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, probs_or_logits: torch.Tensor, label: torch.Tensor, *, probs: bool) -> torch.Tensor:
        k = min(5, probs_or_logits.shape[1])
        top = probs_or_logits.topk(k, dim=1).indices
        hit = top == label.view(-1, 1)
        if probs:
            loss = -torch.log(probs_or_logits.gather(1, label.view(-1, 1)).clamp_min(1e-38)).sum()
        else:
            loss = F.cross_entropy(probs_or_logits.float(), label, reduction="sum")  # caffe: SoftmaxWithLoss
        n = torch.tensor(float(label.numel()), dtype=torch.float64, device=self.t.device)
        b = torch.stack([hit[:, 0].sum().double(), hit.any(1).sum().double(), loss.detach().double(), n])
        self.t += b
        return b

    @staticmethod
    def summary(t: torch.Tensor) -> dict:
        n = max(float(t[3]), 1.0)
        return {"top-1": float(t[0]) / n, "top-5": float(t[1]) / n, "loss": float(t[2]) / n, "images": int(t[3])}


def evaluate(
    model: str | os.PathLike,
    weights: str | os.PathLike | None,
    *,
    iterations: int | None = None,
    gpu: str | None = None,
    ten_crop: bool = False,
    num_workers: int = 2,
    base_dir: str | os.PathLike | None = None,
    on_batch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Score the TEST phase of ``model`` with ``weights``; returns {"top-1", "top-5", "loss", "images"}.

    ``gpu`` is train's ``--gpu`` (cpu, all, or ids: one per process under torchrun); None is the CPU, as
    ``caffe test`` without -gpu. Under torchrun this joins the process group (gloo on CPU, nccl on GPU) and
    leaves it when done, unless the caller had started it. ``on_batch(i, metrics)`` is called on rank 0 after
    each of its batches (``caffe test`` logs each batch).
    """
    from resnet_imagenet.train import dist as D

    owned = not torch.distributed.is_initialized()
    procs = D.init_procs("cpu" if gpu is None else gpu)
    clean = False
    try:
        result = _evaluate(model, weights, procs, iterations, ten_crop, num_workers, base_dir, on_batch)
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


def _evaluate(model, weights, procs, iterations, ten_crop, num_workers, base_dir, on_batch) -> dict:
    from resnet_imagenet.net.net import load_net

    net = load_net(model, weights=weights, phase="test").to(procs.device).eval()
    layer = _test_feed_layer(net, model)
    blob, data_name, label_name = classifier_blob(net), layer.top[0], layer.top[1]
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if ten_crop and not layer.transform_param.crop_size:
        raise ValueError(f"{model}: --ten-crop needs transform_param.crop_size in layer '{layer.name}'")
    feed, batches = _batches(layer, procs, iterations, ten_crop, num_workers, base)
    tally = _Tally(procs.device)
    with torch.inference_mode():
        for i, (x, label) in enumerate(batches):
            n = len(label)
            x = x.flatten(0, 1) if ten_crop else x  # (n, 10, C, c, c) -> (10n, C, c, c), crops of an image together
            lab = label.repeat_interleave(10) if ten_crop else label
            scores = net(**{data_name: x, label_name: lab}, blobs=[blob])[blob].float().flatten(1)
            if ten_crop:
                b = tally.add(F.softmax(scores, dim=1).view(n, 10, -1).mean(1), label, probs=True)
            else:
                b = tally.add(scores, label, probs=False)
            if procs.rank == 0 and on_batch is not None:
                on_batch(i, _Tally.summary(b))
    feed.close()
    total = tally.t
    if procs.world_size > 1:
        torch.distributed.all_reduce(total)  # sums over the disjoint shares: every image once
    return _Tally.summary(total)


# --- the command ---

_EVALUATE = inspect.signature(evaluate).parameters


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "test")
    p.add_argument("--model", required=True, help="train_val prototxt (its TEST-phase data layer names the LMDB)")
    p.add_argument("--weights", required=True, help=".caffemodel")
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


def _log_batch(i: int, m: dict) -> None:
    log.info("Batch %d, top-1 = %.5g, top-5 = %.5g, loss = %.5g", i, m["top-1"], m["top-5"], m["loss"])


def run(args: argparse.Namespace) -> int:
    r = evaluate(
        args.model,
        args.weights,
        iterations=args.iterations,
        gpu=args.gpu,
        ten_crop=args.ten_crop,
        num_workers=args.workers,
        on_batch=_log_batch,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"images = {r['images']}{' (10 crops each)' if args.ten_crop else ''}")
        print(f"top-1 = {r['top-1']:.5f}")
        print(f"top-5 = {r['top-5']:.5f}")
        print(f"loss = {r['loss']:.5f}")
    return 0
