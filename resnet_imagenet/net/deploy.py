"""A deploy net from a train_val net: what Caffe users write by hand as deploy.prototxt."""

from __future__ import annotations

from resnet_imagenet.net.phase import filter_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import DATA_LAYER_TYPES, TEST, PrototxtError

# Layers that read a data source (or make their tops): the deploy net has an Input in their place.
SOURCE_LAYER_TYPES = (*DATA_LAYER_TYPES, "HDF5Data", "DummyData", "WindowData")
# A loss whose first bottom is the scores, and the layer a deploy net ends with instead (its "prob" top).
_HEADS = {"SoftmaxWithLoss": "Softmax", "SigmoidCrossEntropyLoss": "Sigmoid"}


def deploy_from(train_val: caffe_pb2.NetParameter, input_shape: tuple[int, ...]) -> caffe_pb2.NetParameter:
    """A deploy net from a train_val: an Input layer shaped ``input_shape`` for the first data layer's first top
    (Data, ImageData, HDF5Data, DummyData, ...), the TEST-phase layers that neither read a label (the data layers'
    other tops) nor are losses or Accuracy, nor read what those make; then ``prob`` on the scores of the first
    SoftmaxWithLoss (Softmax) or SigmoidCrossEntropyLoss (Sigmoid). Param names (shared blobs) are kept."""
    test = filter_net(train_val, TEST)
    data_layers = [lp for lp in test.layer if lp.type in SOURCE_LAYER_TYPES]
    if not data_layers:
        raise PrototxtError(f"net '{train_val.name}': no data layer to turn into the deploy net's Input")
    if len(data_layers) > 1:
        lp = data_layers[1]
        raise PrototxtError(f"layer '{lp.name}': a second data layer ({lp.type}); deploy_from makes nets of one input")
    labels = {t for lp in data_layers for t in lp.top[1:]}
    out = caffe_pb2.NetParameter(name=train_val.name)
    inp = out.layer.add(name=data_layers[0].name, type="Input")
    inp.top.append(data_layers[0].top[0])
    inp.input_param.shape.add().dim.extend(input_shape)
    dropped, head = set(labels), None
    for lp in test.layer:
        if lp.type in SOURCE_LAYER_TYPES:
            continue
        if lp.type in _HEADS and head is None:
            head = (_HEADS[lp.type], lp.bottom[0])
        if dropped & set(lp.bottom) or lp.type.endswith("Loss") or lp.type in ("Accuracy", "Silence"):
            dropped.update(t for t in lp.top if t not in lp.bottom)
            continue
        out.layer.add().CopyFrom(_deploy_layer(lp))
    if head is not None and head[1] not in dropped:
        out.layer.add(name="prob", type=head[0], bottom=[head[1]], top=["prob"])
    return out


def _deploy_layer(lp: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
    """``lp`` without what only training reads: rules, multipliers, fillers; BatchNorm on its global statistics."""
    new = caffe_pb2.LayerParameter()
    new.CopyFrom(lp)
    for field in ("include", "exclude", "param", "propagate_down", "loss_weight"):
        new.ClearField(field)
    names = [caffe_pb2.ParamSpec(name=s.name) for s in lp.param]
    for spec, s in zip(names, lp.param):
        if s.HasField("share_mode"):
            spec.share_mode = s.share_mode
    while names and not names[-1].name:
        names.pop()
    new.param.extend(names)  # caffe: AppendParam -- the blobs shared by name stay shared
    for p in (new.convolution_param, new.inner_product_param):
        p.ClearField("weight_filler")
        p.ClearField("bias_filler")
    if lp.type == "BatchNorm":
        new.batch_norm_param.use_global_stats = True
    return new
