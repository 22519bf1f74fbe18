"""NetBuilder: appends Caffe layers to a NetParameter in the zoo's one naming scheme.

The zoo's nets (net/resnet.py, AlexNet in net/zoo.py) are built as caffe_pb2 messages by these few methods,
so they share Kaiming He's names: conv1, bn_conv1, scale_conv1, conv1_relu, pool1, res2a_branch1,
bn2a_branch1, scale2a_branch1, res2a_branch2a, ..., res2a, res2a_relu, ..., pool5, fc1000, prob.
"""

from __future__ import annotations

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import TEST, TRAIN

# ImageNet paths, relative to the directory training runs in (the repository root).
IMAGENET_DATA = {
    "train_source": "data/ilsvrc12_train_lmdb",
    "test_source": "data/ilsvrc12_val_lmdb",
    "mean_file": "data/imagenet_mean.binaryproto",  # 3x224x224 BGR (compute_image_mean)
}

# The tiny demo/test set (10 classes of 32x32 images; the demo writes it).
TINY_DATA = {
    "train_source": "data/tiny_train_lmdb",
    "test_source": "data/tiny_val_lmdb",
    "mean_file": "data/tiny_mean.binaryproto",
}


class NetBuilder:
    """Appends layers to a NetParameter; ``train`` adds fillers and param specs, deploy omits them."""

    def __init__(self, name: str, train: bool, bn_fraction: float | None = None) -> None:
        self.net = caffe_pb2.NetParameter(name=name)
        self.train = train
        self.bn_fraction = bn_fraction  # BatchNorm moving_average_fraction when not Caffe's 0.999

    def add(self, name: str, type: str, bottom: list[str], top: str, phase: int | None = None):
        layer = self.net.layer.add(name=name, type=type)
        layer.bottom.extend(bottom)
        layer.top.append(top)
        if phase is not None:
            layer.include.add(phase=phase)
        return layer

    def params(self, layer, specs: tuple[tuple[float, float], ...]) -> None:
        if self.train:
            for lr_mult, decay_mult in specs:
                layer.param.add(lr_mult=lr_mult, decay_mult=decay_mult)

    def conv(self, name, bottom, num_output, kernel, stride=1, pad=0, bias=False, group=1, filler=None):
        layer = self.add(name, "Convolution", [bottom], name)
        p = layer.convolution_param
        p.num_output = num_output
        p.kernel_size.append(kernel)
        p.pad.append(pad)
        p.stride.append(stride)
        if group != 1:
            p.group = group
        if not bias:
            p.bias_term = False
        if self.train:
            p.weight_filler.CopyFrom(filler or caffe_pb2.FillerParameter(type="msra"))
            if bias:
                p.bias_filler.type = "constant"
        return layer

    def fc(self, name, bottom, num_output, filler=None):
        layer = self.add(name, "InnerProduct", [bottom], name)
        layer.inner_product_param.num_output = num_output
        if self.train:
            layer.inner_product_param.weight_filler.CopyFrom(filler or caffe_pb2.FillerParameter(type="msra"))
            layer.inner_product_param.bias_filler.type = "constant"
        return layer

    def bn_scale(self, blob: str, suffix: str) -> None:
        """BatchNorm + Scale in place on ``blob``: bn<suffix>, scale<suffix> (Kaiming's names)."""
        bn = self.add(f"bn{suffix}", "BatchNorm", [blob], blob)
        if self.train:
            # caffe: BatchNorm's 3 blobs are statistics, not learned -- they must get lr_mult 0.
            self.params(bn, ((0, 0),) * 3)
            if self.bn_fraction is not None:
                bn.batch_norm_param.moving_average_fraction = self.bn_fraction
        else:
            bn.batch_norm_param.use_global_stats = True
        self.add(f"scale{suffix}", "Scale", [blob], blob).scale_param.bias_term = True

    def relu(self, blob: str, name: str | None = None) -> None:
        self.add(name or f"{blob}_relu", "ReLU", [blob], blob)

    def pool(self, name, bottom, method, kernel=0, stride=1, global_pooling=False):
        p = self.add(name, "Pooling", [bottom], name).pooling_param
        p.pool = method
        if global_pooling:
            p.global_pooling = True
        else:
            p.kernel_size = kernel
            p.stride = stride

    def data_layers(self, crop: int, batch: int, test_batch: int, data: dict[str, str]) -> None:
        for phase, source, bs in ((TRAIN, data["train_source"], batch), (TEST, data["test_source"], test_batch)):
            layer = self.net.layer.add(name="data", type="Data")
            layer.top.extend(["data", "label"])
            layer.include.add(phase=phase)
            t = layer.transform_param
            if phase == TRAIN:
                t.mirror = True
            t.crop_size = crop
            t.mean_file = data["mean_file"]
            layer.data_param.source = source
            layer.data_param.batch_size = bs
            layer.data_param.backend = caffe_pb2.DataParameter.LMDB

    def input_layer(self, crop: int) -> None:
        layer = self.add("data", "Input", [], "data")
        layer.input_param.shape.add().dim.extend([1, 3, crop, crop])

    def head(self, logits: str) -> None:
        """prob (deploy) or loss + top-1/top-5 accuracy in TEST (train_val)."""
        if not self.train:
            self.add("prob", "Softmax", [logits], "prob")
            return
        self.add("loss", "SoftmaxWithLoss", [logits, "label"], "loss")
        for k in (1, 5):
            # resnet-imagenet-caffe's names: layer accuracy/top1, blob accuracy@1.
            acc = self.add(f"accuracy/top{k}", "Accuracy", [logits, "label"], f"accuracy@{k}", phase=TEST)
            acc.accuracy_param.top_k = k
