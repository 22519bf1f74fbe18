"""resnet-imagenet: train ResNets on ImageNet the Caffe way, on PyTorch."""

from __future__ import annotations

from resnet_imagenet._version import __version__

__all__ = ["load_net", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import resnet_imagenet` (and the CLI's --help) does not import torch.
    if name == "load_net":
        from resnet_imagenet.net.net import load_net

        return load_net
    raise AttributeError(f"module 'resnet_imagenet' has no attribute {name!r}")
