"""The zoo's ResNets: Kaiming He's ResNet-18/50/101/152, resnet-imagenet-caffe's ResNet-32, and a tiny one.

Each is a ResNetSpec (blocks per stage, bottleneck or basic, sizes) built by one body function, so a
stride sits where Kaiming put it (branch2a and branch1) and every layer has his name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from resnet_imagenet.net.builder import IMAGENET_DATA, TINY_DATA, NetBuilder
from resnet_imagenet.proto import caffe_pb2


@dataclass(frozen=True)
class ResNetSpec:
    """One ResNet: blocks per stage (res2, res3, ...), bottleneck or basic blocks, and sizes."""

    title: str
    blocks: tuple[int, ...]
    bottleneck: bool = True
    widths: tuple[int, ...] = (64, 128, 256, 512)  # branch2a/2b channels per stage
    stem: tuple[int, int, int, int] = (64, 7, 2, 3)  # conv1: num_output, kernel, stride, pad
    numbered: bool = False  # Kaiming's 101/152 name long stages res4a, res4b1, res4b2, ...
    stop_after: str | None = None  # truncate the body after this layer (ResNet-32)
    crop: int = 224
    num_classes: int = 1000
    global_pool5: bool = False  # pool5 over the whole map instead of Kaiming's AVE 7x7 stride 1
    v15: bool = False  # torchvision's layout ("ResNet v1.5"): see RESNETS


RESNETS = {
    "resnet_18": ResNetSpec("ResNet-18", (2, 2, 2, 2), bottleneck=False),
    # resnet-imagenet-caffe's ResNet-32: ResNet-50 cut after res4c_branch2a (+bn/scale/relu);
    # pool5 (AVE 7x7 stride 1) over its 14x14x256 map gives 8x8x256 = 16,384 inputs to fc1000.
    "resnet_32": ResNetSpec("ResNet-32", (3, 4, 6, 3), stop_after="res4c_branch2a_relu"),
    "resnet_50": ResNetSpec("ResNet-50", (3, 4, 6, 3)),
    "resnet_101": ResNetSpec("ResNet-101", (3, 4, 23, 3), numbered=True),
    "resnet_152": ResNetSpec("ResNet-152", (3, 8, 36, 3), numbered=True),
    # torchvision's ResNets ("v1.5"): the stride of a stage's first bottleneck on its 3x3 (branch2b) instead of
    # Kaiming's 1x1 (branch2a), and pool1 padded by 1 and rounding down (torchvision's MaxPool2d(3, 2, 1))
    # where Kaiming's pads 0 and rounds up (same 56x56 size, windows shifted by one pixel). Basic blocks
    # (ResNet-18) stride their first 3x3 either way: there only pool1 differs.
    "resnet_18_v15": ResNetSpec("ResNet-18-v1.5", (2, 2, 2, 2), bottleneck=False, v15=True),
    "resnet_50_v15": ResNetSpec("ResNet-50-v1.5", (3, 4, 6, 3), v15=True),
    "resnet_101_v15": ResNetSpec("ResNet-101-v1.5", (3, 4, 23, 3), numbered=True, v15=True),
    "resnet_152_v15": ResNetSpec("ResNet-152-v1.5", (3, 8, 36, 3), numbered=True, v15=True),
    "resnet_tiny": ResNetSpec(
        "ResNet-tiny", (2, 1, 1), widths=(16, 32, 64), stem=(16, 3, 1, 1), crop=32, num_classes=10, global_pool5=True
    ),
}


def _block_names(stage: int, n: int, numbered: bool) -> list[str]:
    """res2a, res2b, ... or, for Kaiming's 101/152 stages longer than 3, res4a, res4b1, res4b2, ..."""
    if numbered and n > 3:
        return [f"res{stage}a"] + [f"res{stage}b{i}" for i in range(1, n)]
    return [f"res{stage}{chr(ord('a') + i)}" for i in range(n)]


def _resnet_body(b: NetBuilder, spec: ResNetSpec) -> str:
    """conv1 .. last residual stage; returns the blob pool5 reads."""
    out, kernel, stride, pad = spec.stem
    b.conv("conv1", "data", out, kernel, stride, pad, bias=True)  # Kaiming's conv1 keeps its bias
    b.bn_scale("conv1", "_conv1")
    b.relu("conv1")
    b.pool("pool1", "conv1", caffe_pb2.PoolingParameter.MAX, 3, 2)
    if spec.v15:
        b.net.layer[-1].pooling_param.pad = 1
        b.net.layer[-1].pooling_param.round_mode = caffe_pb2.PoolingParameter.FLOOR
    blob, channels = "pool1", out
    expansion = 4 if spec.bottleneck else 1
    for s, (n, width) in enumerate(zip(spec.blocks, spec.widths)):
        stage = s + 2
        for i, name in enumerate(_block_names(stage, n, spec.numbered)):
            tag = name[3:]  # "2a", "4b12"
            stride = 2 if i == 0 and s > 0 else 1  # Kaiming: the stride sits on branch2a and branch1 (v1.5: 2b)
            out = width * expansion
            shortcut = blob
            if stride != 1 or channels != out:
                b.conv(f"{name}_branch1", blob, out, 1, stride)
                b.bn_scale(f"{name}_branch1", f"{tag}_branch1")
                shortcut = f"{name}_branch1"
            convs = [(width, 1, stride, 0), (width, 3, 1, 1), (out, 1, 1, 0)]
            if spec.v15:
                convs = [(width, 1, 1, 0), (width, 3, stride, 1), (out, 1, 1, 0)]
            if not spec.bottleneck:
                convs = [(width, 3, stride, 1), (out, 3, 1, 1)]
            bottom = blob
            for j, (c_out, k, st, p) in enumerate(convs):
                branch = f"{name}_branch2{chr(ord('a') + j)}"
                b.conv(branch, bottom, c_out, k, st, p)
                b.bn_scale(branch, f"{tag}_branch2{chr(ord('a') + j)}")
                if j < len(convs) - 1:
                    b.relu(branch)
                if branch + "_relu" == spec.stop_after:
                    return branch
                bottom = branch
            b.add(name, "Eltwise", [shortcut, bottom], name)
            b.relu(name)
            blob, channels = name, out
    return blob


def resnet(key: str, train: bool, num_classes: int | None = None) -> caffe_pb2.NetParameter:
    """train_val (``train=True``: Data layers, fillers, loss, accuracy) or deploy net of a ResNet."""
    spec = RESNETS[key]
    if num_classes is not None:
        spec = dataclasses.replace(spec, num_classes=num_classes)
    # Caffe's default fraction 0.999 averages the statistics of ~1000 iterations -- all of the tiny
    # net's training, early weights included -- and its test accuracy then swings by 0.3; 0.9 does not.
    b = NetBuilder(spec.title, train, bn_fraction=0.9 if key == "resnet_tiny" else None)
    if train:
        b.data_layers(spec.crop, 32, 50, TINY_DATA if key == "resnet_tiny" else IMAGENET_DATA)
    else:
        b.input_layer(spec.crop)
    last = _resnet_body(b, spec)
    b.pool("pool5", last, caffe_pb2.PoolingParameter.AVE, 7, 1, global_pooling=spec.global_pool5)
    fc = f"fc{spec.num_classes}"
    b.fc(fc, "pool5", spec.num_classes)
    b.head(fc)
    return b.net
