"""``classify``: top-5 classes of image files with a deploy net, preprocessed as the model was trained.

Mean and scale: ``--mean`` / ``--scale`` when given; else the transform_param of the TEST-phase data layer of the
model, or of the ``train_val.prototxt`` beside a deploy prototxt (the zoo's and BVLC's layout), as the model was
tested; else no mean and scale 1, with a warning (``--mean none`` says so on purpose).

Geometry: the shorter side is resized to 256/224 of the net's input size, then the centre crop of the input size
is taken (256 -> 224 for ImageNet nets); when the mean is a full-size image mean (e.g. 256x256 from
compute_image_mean over a ``--resize_height/--resize_width`` LMDB), the image is resized to the mean's size
instead, as convert_imageset did for training. Pixels are BGR, the mean is subtracted at the crop's pixels.
``ten_crop`` averages the softmax of the 4 corner and centre crops and their mirrors.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from resnet_imagenet.data.db import read_classes
from resnet_imagenet.data.devicetransform import ten_crops
from resnet_imagenet.data.mean import load_mean
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.tools import add_command
from resnet_imagenet.tools._flags import add_allow_missing_weights_flag, add_gpu_flag, one_device
from resnet_imagenet.util.glog import error_line

log = logging.getLogger(__name__)

_WNID = re.compile(r"^n\d{8}\s+(.*\S)\s*$")
RESIZE_RATIO = 256 / 224  # the ImageNet habit: resize to 256, crop 224


def default_labels_path() -> Path:
    """The shipped ImageNet-1k class list (resnet_imagenet/data/_info/synset_words.txt)."""
    return Path(str(resources.files("resnet_imagenet.data") / "_info" / "synset_words.txt"))


def load_labels(path: str | os.PathLike | None, num_classes: int) -> list[str]:
    """Class names in label order.

    Reads Caffe's synset_words.txt style (``n01440764 tench, Tinca tinca``: the WNID is dropped) or a plain
    class list (one name per line, as convert_imageset writes for class folders). Without a path: the shipped
    ImageNet-1k list for 1000-class nets, else ``class 0``, ``class 1``, ...
    """
    if path is None:
        if num_classes != 1000:
            return [f"class {i}" for i in range(num_classes)]
        path = default_labels_path()
    if Path(path).is_dir():  # an LMDB folder: the class list built with it (data/db.py read_classes)
        names = read_classes(path)
        if names is None:
            raise ValueError(f"{path}: a DB without a class list (built from a list file?)")
    else:
        names = _read_names(path)
    if len(names) != num_classes:
        log.warning("%s: %d class names for a net with %d outputs", path, len(names), num_classes)
    return names + [f"class {i}" for i in range(len(names), num_classes)]


def _read_names(path: str | os.PathLike) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{i}: empty class name")
        m = _WNID.match(line)
        names.append(m.group(1) if m else line.strip())
    return names


def net_transform(model: str | os.PathLike) -> tuple[caffe_pb2.LayerParameter, Path] | None:
    """The TEST-phase Data / ImageData layer with a mean or scale of ``model``, else of the train_val.prototxt
    beside it; with the prototxt it is in."""
    from resnet_imagenet.net.phase import filter_net
    from resnet_imagenet.proto.text import TEST, read_net

    beside = Path(model).with_name("train_val.prototxt")
    for path in [Path(model)] + ([beside] if beside.is_file() and beside != Path(model) else []):
        try:
            layers = filter_net(read_net(path), TEST).layer
        except ValueError as e:  # an unreadable train_val beside the model: not the model's fault
            log.warning("%s: not read for the mean (%s)", path, e)
            continue
        for lp in layers:
            tp = lp.transform_param
            if lp.type in ("Data", "ImageData") and (tp.HasField("mean_file") or tp.mean_value or tp.HasField("scale")):
                return lp, path
    return None


def _mean_from(model: str | os.PathLike, found, channels: int) -> np.ndarray | None:
    """The mean of the data layer ``found`` (net_transform): mean_file from the cwd as Caffe, else beside the
    prototxt; None (with a warning) where there is none."""
    if found is None or not (found[0].transform_param.HasField("mean_file") or found[0].transform_param.mean_value):
        log.warning("%s: no --mean and no mean in a TEST data layer (nor a train_val.prototxt beside it): "
                    "subtracting nothing (--mean none: on purpose)", model)  # fmt: skip
        return None
    lp, path = found
    tp = lp.transform_param
    base = None
    if tp.HasField("mean_file") and not Path(tp.mean_file).is_file():
        base = path.parent
        if not (base / tp.mean_file).is_file():
            raise FileNotFoundError(f"{path}: layer '{lp.name}': mean_file {tp.mean_file} not found (from the cwd or "
                                    f"{base}); give --mean (a file, values, or none)")  # fmt: skip
    what = f"mean_file {tp.mean_file}" if tp.HasField("mean_file") else f"mean_value {list(tp.mean_value)}"
    log.info("Mean: %s (layer '%s' of %s)", what, lp.name, path)
    return load_mean(tp, channels, base, layer=lp.name)


def parse_mean(mean: str | os.PathLike | None, channels: int) -> np.ndarray | None:
    """``--mean``: a mean.binaryproto (C x H x W) or per-channel values ``104,117,123`` (C x 1 x 1); None = none."""
    if mean is None:
        return None
    text = str(mean)
    tp = caffe_pb2.TransformationParameter()
    if not Path(text).exists() and re.fullmatch(r"[-+0-9.eE]+(,[-+0-9.eE]+)*", text):
        tp.mean_value.extend(float(t) for t in text.split(","))
    else:
        tp.mean_file = text
    return load_mean(tp, channels)


@dataclass
class Prediction:
    path: str
    top: list[tuple[int, str, float]]  # (label, name, score), best first


class Classifier:
    """A deploy net with its preprocessing; ``classify(path)`` -> Prediction (ValueError for a bad image)."""

    def __init__(
        self,
        model: str | os.PathLike,
        weights: str | os.PathLike | None,
        mean: str | os.PathLike | None = None,
        labels: str | os.PathLike | None = None,
        *,
        ten_crop: bool = False,
        gpu: str | None = None,
        scale: float | None = None,
        allow_missing_weights: bool = False,
    ):
        """``mean`` None and ``scale`` None: the model's transform_param (module doc); ``mean`` "none": no mean."""
        from resnet_imagenet.net.net import load_net
        from resnet_imagenet.net.weights import load_weights

        self.device = torch.device(one_device(gpu))  # one process: one GPU id, or the CPU
        self.net = load_net(model, phase="test")
        if weights:
            load_weights(self.net, weights, missing="allow" if allow_missing_weights else "refuse")
        self.net = self.net.to(self.device).eval()
        if not self.net.input_names:
            raise ValueError(f"{model}: the net has no input")
        self.input = self.net.input_names[0]
        shape = self.net.input_shapes[self.input]
        if len(shape) != 4:
            raise ValueError(f"{model}: input '{self.input}' has shape {shape}, not N x C x H x W")
        self.channels, self.crop_h, self.crop_w = int(shape[1]), int(shape[2]), int(shape[3])
        if self.crop_h != self.crop_w:
            raise ValueError(f"{model}: input {self.crop_h}x{self.crop_w} is not square")
        found = net_transform(model) if mean is None or scale is None else None
        if mean is None:
            self.mean = _mean_from(model, found, self.channels)
        else:
            self.mean = None if str(mean).lower() == "none" else parse_mean(mean, self.channels)
        if scale is None:
            scale = found[0].transform_param.scale if found else 1.0
        self.scale, self.ten_crop = scale, ten_crop
        outs = [b for b in self.net.output_names if b not in self.net.loss_weights]
        if len(outs) != 1:
            raise ValueError(f"{model}: expected one output blob (the class scores), found {outs}")
        self.output = outs[0]
        producer = [lp for lp in self.net.layer_params if self.output in lp.top][-1]
        self.is_prob = producer.type == "Softmax"
        self.num_classes = int(np.prod(self.net.blob_shapes[self.output][1:]))
        self.labels = load_labels(labels, self.num_classes)

    def preprocess(self, buf: bytes) -> torch.Tensor:
        """Image file bytes -> raw BGR pixels (1, C, H, W) at the size the crops are taken from."""
        from resnet_imagenet.data import transform as T

        img = T.decode_image(buf, T.GRAY if self.channels == 1 else T.COLOR)
        crop = self.crop_h
        if self.mean is not None and self.mean.shape[1:] not in ((1, 1), (crop, crop)):
            mh, mw = self.mean.shape[1:]
            img = T.resize_exact(img, mh, mw)  # the training images' size (convert_imageset --resize_*)
        else:
            img = T.resize_shorter(img, max(crop, round(crop * RESIZE_RATIO)))
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))[None]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (num_classes,) of one preprocessed image, averaged over its crops."""
        mean = None if self.mean is None else torch.from_numpy(self.mean)
        crops = list(ten_crops(x, self.crop_h, mean, self.scale, centre_only=not self.ten_crop))
        batch = torch.cat(crops).to(self.device)
        with torch.inference_mode():
            out = self.net(**{self.input: batch}, blobs=[self.output])[self.output].float().flatten(1)
        probs = out if self.is_prob else F.softmax(out, dim=1)
        return probs.mean(0).cpu()

    def classify(self, path: str | os.PathLike, top_k: int = 5) -> Prediction:
        buf = Path(path).read_bytes()
        p = self.scores(self.preprocess(buf))
        vals, idx = p.topk(min(top_k, p.numel()))
        return Prediction(str(path), [(int(i), self.labels[int(i)], float(v)) for v, i in zip(vals, idx)])


def format_prediction(pred: Prediction) -> str:
    """``PATH`` then one ``name (score = 0.88493)`` line per class, best first."""
    return "\n".join([pred.path] + [f"{name} (score = {score:.5f})" for _, name, score in pred.top])


# --- the command ---


def add_parser(sub: argparse._SubParsersAction) -> None:
    params = inspect.signature(Classifier).parameters
    p = add_command(sub, "classify")
    p.add_argument("--model", required=True, help="deploy prototxt")
    p.add_argument("--weights", required=True, help=".caffemodel")
    add_allow_missing_weights_flag(p, params["allow_missing_weights"].default)
    p.add_argument(
        "--mean",
        default=params["mean"].default,
        help="mean.binaryproto, per-channel values such as 104,117,123, or none; default: the mean_file / "
        "mean_value of the model's TEST data layer, or of the train_val.prototxt beside it, else none (warned)",
    )
    labels_help = (
        "synset_words.txt, a class list (one name per line) or an LMDB built from class folders "
        "(default: the shipped ImageNet-1k list for "
    )
    p.add_argument("--labels", default=None, help=labels_help + "1000-class nets)")
    p.add_argument("--ten-crop", action="store_true", help="average 10 crops: 4 corners + centre, each mirrored")
    p.add_argument(
        "--scale",
        type=float,
        default=params["scale"].default,
        help="transform_param scale the model was trained with (default: as --mean finds it, else 1)",
    )
    add_gpu_flag(p, default="CPU")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    clf = Classifier(
        args.model, args.weights, args.mean, args.labels, ten_crop=args.ten_crop, gpu=args.gpu, scale=args.scale,
        allow_missing_weights=args.allow_missing_weights,
    )  # fmt: skip
    failed = 0
    for path in args.images:
        try:
            print(format_prediction(clf.classify(path)), flush=True)
        except (OSError, ValueError) as e:  # a bad image: one line, the others still run
            failed += 1
            error_line(f"resnet-imagenet classify: error: {path}: {e}")
    return 1 if failed else 0
