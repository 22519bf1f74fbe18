"""One module per command: each has ``add_parser(sub)`` (its flags) and a ``run(args)`` handler.

COMMANDS names every command's module and one-line help, so ``resnet-imagenet --help`` lists them without
importing any tool (and so without torch); cli.py imports the chosen command's module only.
"""

from __future__ import annotations

import argparse

COMMANDS: dict[str, tuple[str, str]] = {  # command: (module in resnet_imagenet.tools, one-line help)
    "summary": ("summary", "per-layer top shapes, parameters and multiply-adds of a net"),
    "time": ("time", "caffe time: average forward and backward time per layer and per iteration"),
    "convert_imageset": ("convert_imageset", "images -> LMDB of Caffe Datums"),
    "convert_imagenet": ("convert_imagenet", "stream the ILSVRC2012 tars into train/val LMDBs"),
    "valprep": ("convert_imagenet", "move ILSVRC2012 val images into synset folders"),
    "compute_image_mean": ("compute_image_mean", "per-pixel BGR mean of an LMDB -> mean.binaryproto"),
    "train": ("train", "train a net with Caffe's solver (one process, or one per GPU under torchrun / ./train.sh)"),
    "prune": ("prune", "channel pruning (LASSO selection + least-squares reconstruction) into a new model folder"),
    "parse_log": ("logs", "CSV files LOG.train and LOG.test from a Caffe-format training log"),
    "plot_log": ("logs", "plot training loss (raw and smoothed) and accuracy against iteration"),
    "test": ("test", "score a trained net on its TEST phase data (caffe test): top-1, top-5, loss"),
    "export": ("export", "a deploy net -> ONNX, TorchScript or torchvision, BatchNorm folded, checked on reload"),
    "import_torchvision": ("import_torchvision", "a torchvision ResNet state dict -> prototxts + caffemodel"),
    "classify": ("classify", "top-5 classes of image files with a deploy net"),
    "demo": ("demo", "the whole pipeline on the built-in dataset, in a few CPU minutes (make demo)"),
    "upgrade_net_proto_text": ("upgrade_net_proto", "write a V0/V1 net prototxt in today's format (caffe's tool)"),
    "upgrade_net_proto_binary": ("upgrade_net_proto", "write a V0/V1 caffemodel in today's format (caffe's tool)"),
    "device_query": ("device_query", "list the GPUs and their properties (caffe device_query)"),
    "demo_data": ("demo_data", "write the built-in demo dataset (JPEGs in class folders, train and val)"),
}


def add_command(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """The subparser of command ``name``, with its help from COMMANDS."""
    return sub.add_parser(name, help=COMMANDS[name][1], **kwargs)
