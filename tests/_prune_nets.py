"""Nets for the pruning tests: the tiny zoo ResNet's prototxt and a fixed 2-block bottleneck net."""

from __future__ import annotations

from pathlib import Path

import torch

from resnet_imagenet.net import layers as L
from resnet_imagenet.net.net import CaffeNet, load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "prototxt_like" / "resnet_tiny" / "train_val.prototxt"


def block(name: str, bottom: str) -> str:
    """A bottleneck block with an identity shortcut; its Eltwise output is the blob ``name``."""
    text, prev = "", bottom
    for part, k in (("2a", 1), ("2b", 3), ("2c", 1)):
        top = f"{name}_{part}"
        text += f"""
        layer {{ name: "{top}" type: "Convolution" bottom: "{prev}" top: "{top}"
                convolution_param {{ num_output: 8 kernel_size: {k} pad: {k // 2} bias_term: false }} }}
        layer {{ name: "{top}_bn" type: "BatchNorm" bottom: "{top}" top: "{top}" }}
        layer {{ name: "{top}_scale" type: "Scale" bottom: "{top}" top: "{top}" scale_param {{ bias_term: true }} }}"""
        if part != "2c":
            text += f'\n        layer {{ name: "{top}_relu" type: "ReLU" bottom: "{top}" top: "{top}" }}'
        prev = top
    return (
        text
        + f"""
        layer {{ name: "{name}" type: "Eltwise" bottom: "{bottom}" bottom: "{prev}" top: "{name}" }}
        layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}_out" }}"""
    )


def two_blocks_net() -> tuple[CaffeNet, torch.Tensor, torch.Tensor]:
    """A fixed 2-block bottleneck net (8 channels, identity shortcuts), its BatchNorms fitted to its inputs."""
    text = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 8 dim: 6 dim: 6 } } }'
    net = load_net(parse_text(text + block("a", "data") + block("b", "a_out"), caffe_pb2.NetParameter()))
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(8, 3, generator=g)  # inputs of rank 3 in 8 channels: redundancy, as in a trained net
    x = torch.einsum("oc,nchw->nohw", mix, torch.randn(64, 3, 6, 6, generator=g)).relu()
    with torch.no_grad():
        for name, m in net.layers.items():
            if isinstance(m, L.Convolution):  # (the prototxt's default filler is constant 0)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
            if name.endswith("_scale"):
                m.weight.copy_(torch.rand(8, generator=g) * 1.8 + 0.2)
                m.bias.copy_(torch.rand(8, generator=g) - 0.5)
        net.train()
        net(x)
    net.eval()
    return net, x[:48], x[48:]
