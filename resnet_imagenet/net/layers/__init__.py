"""Caffe's layer catalogue, grouped into Caffe's families: base (the registry, CaffeLayer, fillers), vision,
neuron, common and loss. Importing this package registers every family's types (no import at a module's
bottom); the names other packages use are re-exported here (``L.Convolution``, ``L.build_layer``, ...).
"""

from resnet_imagenet.net.layers import common, data, loss, loss_distance, neuron, recurrent, vision  # noqa: F401
from resnet_imagenet.net.layers.base import LAYERS, CaffeLayer, build_layer, fill_, register
from resnet_imagenet.net.layers.common import (
    BatchNorm,
    Concat,
    Eltwise,
    Filter,
    Flatten,
    InnerProduct,
    Scale,
    Softmax,
    Split,
)
from resnet_imagenet.net.layers.data import DummyData, HDF5Data, HDF5Output
from resnet_imagenet.net.layers.loss import (
    Accuracy,
    InfogainLoss,
    MultinomialLogisticLoss,
    SigmoidCrossEntropyLoss,
    SoftmaxWithLoss,
)
from resnet_imagenet.net.layers.loss_distance import ContrastiveLoss, EuclideanLoss, HingeLoss
from resnet_imagenet.net.layers.neuron import Dropout, ReLU, Sigmoid, TanH
from resnet_imagenet.net.layers.recurrent import LSTM, RNN, LSTMUnit
from resnet_imagenet.net.layers.vision import LRN, Convolution, Pooling

__all__ = [
    # base
    "LAYERS",
    "register",
    "build_layer",
    "CaffeLayer",
    "fill_",
    # vision
    "Convolution",
    "Pooling",
    "LRN",
    # neuron
    "ReLU",
    "Sigmoid",
    "TanH",
    "Dropout",
    # common
    "InnerProduct",
    "BatchNorm",
    "Scale",
    "Eltwise",
    "Concat",
    "Flatten",
    "Split",
    "Softmax",
    "Filter",
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
