"""A deploy net from a train_val net: what Caffe users write by hand as deploy.prototxt."""

from __future__ import annotations

from resnet_imagenet.net.phase import filter_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import DATA_LAYER_TYPES, TEST


def deploy_from(train_val: caffe_pb2.NetParameter, input_shape: tuple[int, ...]) -> caffe_pb2.NetParameter:
    """A deploy net from a train_val: an Input layer, TEST-phase layers without label users, then prob."""
    test = filter_net(train_val, TEST)
    data_layers = [lp for lp in test.layer if lp.type in DATA_LAYER_TYPES]
    labels = {t for lp in data_layers for t in lp.top[1:]}
    out = caffe_pb2.NetParameter(name=train_val.name)
    inp = out.layer.add(name=data_layers[0].name, type="Input")
    inp.top.append(data_layers[0].top[0])
    inp.input_param.shape.add().dim.extend(input_shape)
    logits = None
    for lp in test.layer:
        if lp.type in DATA_LAYER_TYPES:
            continue
        if labels & set(lp.bottom):
            logits = lp.bottom[0] if lp.type == "SoftmaxWithLoss" else logits
            continue
        new = out.layer.add()
        new.CopyFrom(lp)
        for field in ("include", "exclude", "param"):
            new.ClearField(field)
        for p in (new.convolution_param, new.inner_product_param):
            p.ClearField("weight_filler")
            p.ClearField("bias_filler")
        if lp.type == "BatchNorm":
            new.batch_norm_param.use_global_stats = True
    if logits is not None:
        out.layer.add(name="prob", type="Softmax", bottom=[logits], top=["prob"])
    return out
