"""Caffe's layer catalogue, grouped into Caffe's families: base (the registry, CaffeLayer, fillers), vision,
neuron, common (with shape and reduce split off) and loss. Importing this package registers every family's
types (no import at a module's bottom); the names other packages use are re-exported here
(``L.Convolution``, ``L.build_layer``, ...).
"""

from resnet_imagenet.net.layers import (  # noqa: F401  (each family registers its types on import)
    common,
    data,
    loss,
    loss_distance,
    neuron,
    recurrent,
    reduce,
    shape,
    vision,
)
from resnet_imagenet.net.layers.base import LAYERS, CaffeLayer, build_layer, fill_, register
from resnet_imagenet.net.layers.common import BatchNorm, Bias, Eltwise, Embed, InnerProduct, Parameter, Scale, Softmax
from resnet_imagenet.net.layers.data import DummyData, HDF5Data, HDF5Output
from resnet_imagenet.net.layers.loss import (
    Accuracy,
    InfogainLoss,
    MultinomialLogisticLoss,
    SigmoidCrossEntropyLoss,
    SoftmaxWithLoss,
)
from resnet_imagenet.net.layers.loss_distance import ContrastiveLoss, EuclideanLoss, HingeLoss
from resnet_imagenet.net.layers.neuron import (
    BNLL,
    ELU,
    AbsVal,
    Clip,
    Dropout,
    Exp,
    Log,
    Power,
    PReLU,
    ReLU,
    Sigmoid,
    Swish,
    TanH,
    Threshold,
)
from resnet_imagenet.net.layers.recurrent import LSTM, RNN, LSTMUnit
from resnet_imagenet.net.layers.reduce import MVN, ArgMax, Reduction
from resnet_imagenet.net.layers.shape import (
    BatchFilter,
    BatchReindex,
    Concat,
    Crop,
    Filter,
    Flatten,
    Reshape,
    Silence,
    Slice,
    Split,
    Tile,
)
from resnet_imagenet.net.layers.vision import LRN, SPP, Convolution, Deconvolution, Im2col, Pooling

__all__ = [
    # base
    "LAYERS",
    "register",
    "build_layer",
    "CaffeLayer",
    "fill_",
    # vision
    "Convolution",
    "Deconvolution",
    "Im2col",
    "SPP",
    "Pooling",
    "LRN",
    # neuron
    "ReLU",
    "Sigmoid",
    "TanH",
    "Dropout",
    "PReLU",
    "ELU",
    "AbsVal",
    "BNLL",
    "Clip",
    "Exp",
    "Log",
    "Power",
    "Swish",
    "Threshold",
    # common
    "InnerProduct",
    "BatchNorm",
    "Scale",
    "Bias",
    "Eltwise",
    "Softmax",
    "Embed",
    "Parameter",
    # common: reductions
    "MVN",
    "Reduction",
    "ArgMax",
    # common: shapes
    "Concat",
    "Slice",
    "Split",
    "Flatten",
    "Reshape",
    "Tile",
    "Crop",
    "BatchReindex",
    "Filter",
    "BatchFilter",
    "Silence",
    # loss
    "SoftmaxWithLoss",
    "Accuracy",
    "SigmoidCrossEntropyLoss",
    "InfogainLoss",
    "MultinomialLogisticLoss",
    "EuclideanLoss",
    "ContrastiveLoss",
    "HingeLoss",
    # recurrent
    "RNN",
    "LSTM",
    "LSTMUnit",
    # data
    "DummyData",
    "HDF5Data",
    "HDF5Output",
]
