"""Export a net to ONNX or TorchScript, folded (net/fold.py) and checked by reloading it in that runtime.

The file is written to a temporary name beside the target, reloaded there (onnxruntime for ONNX,
torch.jit.load for TorchScript), run on a random batch of another size than the traced one (the batch
axis is dynamic) and compared with the unfolded net on the same batch; only a file whose outputs agree
within ``rtol`` (max |difference| / max |reference|, per output) is renamed into place.

ONNX goes through torch's TorchScript-based exporter (``dynamo=False``): it needs only the ``onnx``
package (the torch.export-based one also needs onnxscript), writes opset 17 directly (the other starts
at 18 and converts down) and takes a fraction of the time; CaffeNet's forward is plain tensor code
over a fixed layer list, which tracing records exactly.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from resnet_imagenet.net.fold import _crop_mean, fold_input, fold_net
from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.util.atomic import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
OPSET = 17


class DeployModule(nn.Module):
    """A CaffeNet as a plain module: positional inputs in ``input_names`` order, a tuple of the outputs."""

    def __init__(self, net: CaffeNet) -> None:
        super().__init__()
        self.net = net
        self.output_names = list(net.output_names)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(*xs)
        return tuple(out[name] for name in self.output_names)


@dataclass
class InputTransform:
    """What the exported net folds in: x = (pixels - mean) * scale (Caffe's TEST transform_param)."""

    mean: torch.Tensor | None = None  # (C,) per channel or (C, H, W) per pixel
    scale: float = 1.0

    @property
    def folded(self) -> bool:
        return self.mean is not None or self.scale != 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = x - _crop_mean(self.mean, *x.shape[1:]).to(x.dtype)
        return x * self.scale


@dataclass
class ExportReport:
    path: Path
    format: str
    input_names: list[str]
    output_names: list[str]
    folded_layers: int  # BatchNorm, Scale and Dropout layers folded away
    max_rel_error: dict[str, float] = field(default_factory=dict)


def deploy_net(net: CaffeNet, transform: InputTransform | None = None) -> CaffeNet:
    """``net`` folded for deployment: BatchNorm/Scale/Dropout folded, and the input transform when given."""
    folded = fold_net(net)
    if transform is not None and transform.folded:
        fold_input(folded, transform.mean, transform.scale)
    return folded.eval()


def random_inputs(net: CaffeNet, batch: int, pixels: bool, seed: int = 0) -> list[torch.Tensor]:
    """A random batch for each input: pixels in [0, 255] (a folded mean) or standard normal values."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in net.input_names:
        shape = (batch, *net.input_shapes[name][1:])
        out.append(torch.rand(shape, generator=gen) * 255 if pixels else torch.randn(shape, generator=gen))
    return out


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 when both are all zero)."""
    scale = want.abs().max().item()
    diff = (got.double() - want.double()).abs().max().item()
    return diff / scale if scale else diff


def _write_onnx(module: DeployModule, example: list[torch.Tensor], path: Path, net: CaffeNet) -> None:
    names = [*net.input_names, *module.output_names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation note and tracer notes
        torch.onnx.export(
            module,
            tuple(example),
            str(path),
            input_names=list(net.input_names),
            output_names=module.output_names,
            opset_version=OPSET,
            dynamic_axes={n: {0: "batch"} for n in names},
            dynamo=False,
        )


def _run_onnx(path: Path, net: CaffeNet, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("checking an ONNX export needs onnxruntime: pip install resnet-imagenet[deploy]") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {n: x.numpy() for n, x in zip(net.input_names, xs)})
    return [torch.from_numpy(o) for o in outs]


def _write_torchscript(module: DeployModule, example: list[torch.Tensor], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, tuple(example), check_trace=False)
        torch.jit.save(traced, str(path))


def _run_torchscript(path: Path, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation note
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return list(loaded(*xs))


def export(
    net: CaffeNet,
    fmt: str,
    out: str | os.PathLike,
    transform: InputTransform | None = None,
    rtol: float = 1e-4,
    batch: int = 2,
) -> ExportReport:
    """Fold ``net`` and write it as ``fmt`` (onnx, torchscript) to ``out``, checked as the module docstring says;
    raises ValueError (and writes nothing) when the reloaded file disagrees with ``net``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    transform = transform or InputTransform()
    net = net.cpu().eval()
    folded = deploy_net(net, transform)
    module = DeployModule(folded).eval()
    n_folded = len(net.layer_params) - len(folded.layer_params)
    example = random_inputs(net, batch, transform.folded, seed=1)
    check = random_inputs(net, batch + 1, transform.folded, seed=2)
    with torch.no_grad():
        ref = net(*[transform.apply(x) for x in check])
    report = ExportReport(Path(out), fmt, list(net.input_names), module.output_names, n_folded)
    with atomic_path(out) as tmp, torch.no_grad():
        if fmt == "onnx":
            _write_onnx(module, example, tmp, net)
            got = _run_onnx(tmp, net, check)
        else:
            _write_torchscript(module, example, tmp)
            got = _run_torchscript(tmp, check)
        for name, g in zip(module.output_names, got):
            err = report.max_rel_error[name] = rel_error(g, ref[name])
            if tuple(g.shape) != tuple(ref[name].shape) or not err <= rtol:
                raise ValueError(
                    f"{out}: the {fmt} export's output '{name}' differs from the net's: {tuple(g.shape)} vs "
                    f"{tuple(ref[name].shape)}, max relative error {err:.3g} > {rtol:g}; nothing written"
                )
    log.info("wrote %s (%s), max relative error %s", out, fmt, report.max_rel_error)
    return report
