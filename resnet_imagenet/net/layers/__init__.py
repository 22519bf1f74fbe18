"""Caffe's layer catalogue. Importing this package registers every layer family (no import at a module's bottom)."""

from resnet_imagenet.net.layers import base, misc  # noqa: F401  (each family registers its types on import)
from resnet_imagenet.net.layers.base import (
    BatchNorm,
    CaffeLayer,
    Convolution,
    InnerProduct,
    Pooling,
    Scale,
    build_layer,
    fill_,
    register,
)
from resnet_imagenet.net.layers.misc import (
    LRN,
    Accuracy,
    Concat,
    Dropout,
    Eltwise,
    Filter,
    Flatten,
    ReLU,
    Sigmoid,
    Softmax,
    SoftmaxWithLoss,
    Split,
    TanH,
)

__all__ = [
    "register",
    "build_layer",
    "CaffeLayer",
    "fill_",
    "Convolution",
    "Pooling",
    "BatchNorm",
    "Scale",
    "InnerProduct",
    "ReLU",
    "Sigmoid",
    "TanH",
    "Dropout",
    "Eltwise",
    "Concat",
    "Flatten",
    "Split",
    "LRN",
    "Softmax",
    "SoftmaxWithLoss",
    "Accuracy",
    "Filter",
]
