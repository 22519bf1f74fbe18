"""``export``: a deploy net to ONNX, TorchScript or a torchvision state dict, folded and checked on reload."""

from __future__ import annotations

import argparse

from resnet_imagenet.tools import add_command

FORMATS = ("onnx", "torchscript", "torchvision")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "export",
        description="Fold BatchNorm+Scale into the convolutions before them and drop Dropout, write --out in "
        "--format, reload it in that runtime (onnxruntime, torch.jit, torchvision) and compare it with the net on "
        "a random batch; nothing is written unless it matches.",
    )
    p.add_argument("--model", required=True, help="deploy prototxt (its Input layer names and shapes the input)")
    p.add_argument("--weights", required=True, help=".caffemodel of --model")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="file to write (.onnx, .pt, .pth)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fold-mean", metavar="MEAN.binaryproto", help="fold this mean's subtraction into conv1")
    g.add_argument("--mean-value", metavar="B,G,R", help="fold this per-channel mean's subtraction into conv1")
    p.add_argument("--scale", type=float, default=1.0, help="the transform's scale, folded too (default 1)")
    p.set_defaults(func=run)


def _mean(args: argparse.Namespace):
    import torch

    from resnet_imagenet.proto.blob import read_blobproto

    if args.fold_mean:
        m = read_blobproto(args.fold_mean)
        return torch.from_numpy(m.reshape(m.shape[-3:]).copy())
    if args.mean_value:
        try:
            return torch.tensor([float(v) for v in args.mean_value.split(",")])
        except ValueError:
            raise ValueError(f"--mean-value {args.mean_value!r}: expected numbers like 104,117,123") from None
    return None


def run(args: argparse.Namespace) -> int:
    from resnet_imagenet.net.net import load_net

    net = load_net(args.model, args.weights)
    mean = _mean(args)
    if args.format == "torchvision":
        from resnet_imagenet.net.tvresnet import export_torchvision

        if args.fold_mean:
            raise ValueError("--format torchvision takes --mean-value (torchvision's mean), not --fold-mean")
        err = export_torchvision(net, args.out, mean, args.scale)
        print(f"wrote {args.out} (torchvision state dict; max relative error {err['logits']:.2g})")
        return 0
    from resnet_imagenet.net.export import InputTransform, export

    report = export(net, args.format, args.out, InputTransform(mean, args.scale))
    errs = ", ".join(f"{k} {v:.2g}" for k, v in report.max_rel_error.items())
    print(
        f"wrote {args.out} ({args.format}; inputs {report.input_names}, outputs {report.output_names}, "
        f"{report.folded_layers} layers folded; max relative error {errs})"
    )
    return 0
