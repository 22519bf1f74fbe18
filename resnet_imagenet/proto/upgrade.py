"""Caffe's upgrades of old NetParameters, applied on load (prototxt and caffemodel alike).

caffe: src/caffe/util/upgrade_proto.cpp UpgradeNetAsNeeded, in its order:
  V0 -> V1 (UpgradeV0Net: ``layers { layer { type: "conv" ... } }`` and "padding" layers folded into pad),
  data transformation fields -> transform_param (UpgradeNetDataTransformation),
  V1 -> V2 (UpgradeV1Net: ``layers { type: CONVOLUTION blobs_lr: 1 weight_decay: 1 }`` ->
  ``layer { type: "Convolution" param { lr_mult: 1 decay_mult: 1 } }``, blobs kept),
  input/input_dim/input_shape -> an Input layer (UpgradeNetInput),
  BatchNorm with three param specs -> lr_mult and decay_mult 0 (UpgradeNetBatchNorm).
Where Caffe logs "not fully compatible" and continues (a V0 field on a layer type that has no such field,
both ``layer`` and ``layers`` given), we refuse with a message naming the layer: the result would silently
differ from what the file says.
"""

from __future__ import annotations

import logging

from google.protobuf.descriptor import FieldDescriptor

from resnet_imagenet.proto import caffe_pb2

log = logging.getLogger(__name__)

TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

# caffe: UpgradeV0LayerType -- V0's type strings -> V1's enum names ("padding" is folded away first)
_V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION", "data": "DATA",
    "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN", "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING", "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}  # fmt: skip

_DATA4 = ("data", "hdf5_data", "images", "window_data")
_DATA_PARAMS = {"data": "data_param", "hdf5_data": "hdf5_data_param", "images": "image_data_param",
                "window_data": "window_data_param", "infogain_loss": "infogain_loss_param"}  # fmt: skip
_CONV_IP = {"conv": "convolution_param", "innerproduct": "inner_product_param"}
_CONV_POOL = {"conv": "convolution_param", "pool": "pooling_param"}
_WINDOW = {"window_data": "window_data_param"}
_LRN = {"lrn": "lrn_param"}
_ANY = None  # the field goes to transform_param whatever the type
# caffe: UpgradeV0LayerParameter -- V0 field -> (V1 field name, {V0 type: V1 sub-message}); _ANY: transform_param
_V0_FIELDS: dict[str, tuple[str, dict | None]] = {
    "num_output": ("num_output", _CONV_IP),
    "biasterm": ("bias_term", _CONV_IP),
    "weight_filler": ("weight_filler", _CONV_IP),
    "bias_filler": ("bias_filler", _CONV_IP),
    "pad": ("pad", _CONV_POOL),
    "kernelsize": ("kernel_size", _CONV_POOL),
    "group": ("group", {"conv": "convolution_param"}),
    "stride": ("stride", _CONV_POOL),
    "pool": ("pool", {"pool": "pooling_param"}),
    "dropout_ratio": ("dropout_ratio", {"dropout": "dropout_param"}),
    "local_size": ("local_size", _LRN),
    "alpha": ("alpha", _LRN),
    "beta": ("beta", _LRN),
    "k": ("k", _LRN),
    "source": ("source", _DATA_PARAMS),
    "scale": ("scale", _ANY),
    "meanfile": ("mean_file", _ANY),
    "cropsize": ("crop_size", _ANY),
    "mirror": ("mirror", _ANY),
    "batchsize": ("batch_size", {t: _DATA_PARAMS[t] for t in _DATA4}),
    "rand_skip": ("rand_skip", {t: _DATA_PARAMS[t] for t in ("data", "images")}),
    "shuffle_images": ("shuffle", {"images": "image_data_param"}),
    "new_height": ("new_height", {"images": "image_data_param"}),
    "new_width": ("new_width", {"images": "image_data_param"}),
    "concat_dim": ("concat_dim", {"concat": "concat_param"}),
    "det_fg_threshold": ("fg_threshold", _WINDOW),
    "det_bg_threshold": ("bg_threshold", _WINDOW),
    "det_fg_fraction": ("fg_fraction", _WINDOW),
    "det_context_pad": ("context_pad", _WINDOW),
    "det_crop_mode": ("crop_mode", _WINDOW),
    "hdf5_output_param": ("hdf5_output_param", {"hdf5_output": None}),
}

# caffe: UpgradeV1LayerType -- V1's enum names -> today's type strings
_V1_TYPES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}  # fmt: skip
_V1_DATA_TYPES = {"DATA": "data_param", "IMAGE_DATA": "image_data_param", "WINDOW_DATA": "window_data_param"}
_V1_COPIED = ("bottom", "top", "include", "exclude", "blobs", "loss_weight")


def _set(msg, name: str, value) -> None:
    """Set field ``name`` of ``msg`` to ``value``: copy a message, append to a repeated field, else assign."""
    f = msg.DESCRIPTOR.fields_by_name[name]
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(msg, name).CopyFrom(value)
    elif f.is_repeated:
        getattr(msg, name).append(value)
    else:
        setattr(msg, name, value)


def _fold_padding(net: caffe_pb2.NetParameter) -> list[caffe_pb2.V1LayerParameter]:
    """caffe: UpgradeV0PaddingLayers -- drop V0 "padding" layers, giving their pad to the conv/pool reading them."""
    last_top: dict[str, caffe_pb2.V1LayerParameter | None] = {b: None for b in net.input}
    out: list[caffe_pb2.V1LayerParameter] = []
    for conn in net.layers:
        kept = caffe_pb2.V1LayerParameter()
        kept.CopyFrom(conn)
        for j, b in enumerate(conn.bottom):
            if b not in last_top:
                raise ValueError(f"V0 layer '{conn.layer.name}': unknown bottom blob '{b}'")
            src = last_top[b]
            if src is None or src.layer.type != "padding":
                continue
            if conn.layer.type not in ("conv", "pool") or len(conn.bottom) != 1 or len(src.bottom) != 1:
                raise ValueError(f"V0 layer '{conn.layer.name}': a padding layer may feed one conv or pool bottom")
            kept.layer.pad = src.layer.pad
            kept.bottom[j] = src.bottom[0]
        if conn.layer.type != "padding":
            out.append(kept)
        for t in conn.top:
            last_top[t] = conn
    return out


def _v0_to_v1(conn: caffe_pb2.V1LayerParameter) -> caffe_pb2.V1LayerParameter:
    """caffe: UpgradeV0LayerParameter -- one V0 layer (inside a V1 connection) as a V1 layer."""
    v0, v1 = conn.layer, caffe_pb2.V1LayerParameter(bottom=list(conn.bottom), top=list(conn.top))
    if v0.HasField("name"):
        v1.name = v0.name
    if v0.HasField("type"):
        if v0.type not in _V0_TYPES:
            raise ValueError(f"V0 layer '{v0.name}': unknown layer type '{v0.type}'")
        v1.type = caffe_pb2.V1LayerParameter.LayerType.Value(_V0_TYPES[v0.type])
    v1.blobs.extend(v0.blobs)
    v1.blobs_lr.extend(v0.blobs_lr)
    v1.weight_decay.extend(v0.weight_decay)
    for field, value in v0.ListFields():
        if field.name not in _V0_FIELDS:
            continue
        name, by_type = _V0_FIELDS[field.name]
        if by_type is _ANY:
            _set(v1.transform_param, name, value)
        elif v0.type not in by_type:
            raise ValueError(f"V0 layer '{v0.name}': type '{v0.type}' has no parameter {field.name}")
        elif by_type[v0.type] is None:  # the whole sub-message
            _set(v1, name, value)
        else:
            _set(getattr(v1, by_type[v0.type]), name, value)
    return v1


def upgrade_v0(net: caffe_pb2.NetParameter) -> bool:
    """caffe: UpgradeV0Net -- V0 layers (``layers { layer { ... } }``) -> V1 layers. True if any was upgraded."""
    if not any(conn.HasField("layer") for conn in net.layers):
        return False
    layers = [_v0_to_v1(conn) for conn in _fold_padding(net)]
    net.ClearField("layers")
    net.layers.extend(layers)
    return True


def upgrade_data_transform(net: caffe_pb2.NetParameter) -> bool:
    """caffe: UpgradeNetDataTransformation -- scale/mean_file/crop_size/mirror of a data layer's own param
    move to transform_param (V1 layers as Caffe does; current ``layer``s too, as old hand-edited files have them)."""
    done = False
    v1_name = caffe_pb2.V1LayerParameter.LayerType.Name
    found = [(lp, _V1_DATA_TYPES.get(v1_name(lp.type))) for lp in net.layers]
    found += [(lp, f) for lp in net.layer for f in _V1_DATA_TYPES.values() if lp.HasField(f)]
    for lp, field in found:
        if field is None:
            continue
        p = getattr(lp, field)
        for name in TRANSFORM_FIELDS:
            if p.HasField(name):
                setattr(lp.transform_param, name, getattr(p, name))
                p.ClearField(name)
                done = True
    return done


def _v1_to_v2(v1: caffe_pb2.V1LayerParameter) -> caffe_pb2.LayerParameter:
    """caffe: UpgradeV1LayerParameter -- a V1 layer as a LayerParameter (blobs and per-blob specs kept)."""
    lp = caffe_pb2.LayerParameter()
    for name in _V1_COPIED:
        getattr(lp, name).extend(getattr(v1, name))
    if v1.HasField("name"):
        lp.name = v1.name
    if v1.HasField("type"):
        lp.type = _V1_TYPES[caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)]
    specs = (v1.param, v1.blob_share_mode, v1.blobs_lr, v1.weight_decay)
    for i in range(max(len(s) for s in specs)):
        spec = lp.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]  # STRICT 0, PERMISSIVE 1 in both enums
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    for field, value in v1.ListFields():
        if field.name.endswith("_param"):  # every V1 *_param has a LayerParameter field of the same name
            getattr(lp, field.name).CopyFrom(value)
    return lp


def upgrade_v1(net: caffe_pb2.NetParameter) -> bool:
    """caffe: UpgradeV1Net -- ``layers`` (V1LayerParameter) -> ``layer``. True if any was upgraded."""
    if not net.layers:
        return False
    if net.layer:
        raise ValueError("the net has both 'layer' and the deprecated 'layers' fields; give one")
    for i, v1 in enumerate(net.layers):
        if v1.HasField("layer"):
            raise ValueError(f"V1 layer {i} ('{v1.name}') holds a V0 layer besides its own fields")
        net.layer.append(_v1_to_v2(v1))
    net.ClearField("layers")
    return True


def upgrade_input(net: caffe_pb2.NetParameter) -> bool:
    """caffe: UpgradeNetInput -- ``input`` with ``input_shape`` or 4 ``input_dim`` each -> an Input layer first."""
    if not net.input:
        return False
    if net.input_shape:
        shapes = [list(s.dim) for s in net.input_shape]
    elif net.input_dim:
        if len(net.input_dim) != 4 * len(net.input):
            raise ValueError(
                f"net '{net.name}': input_dim must have 4 values per input "
                f"({len(net.input)} inputs, {len(net.input_dim)} values)"
            )
        dims = list(net.input_dim)
        shapes = [dims[4 * i : 4 * i + 4] for i in range(len(net.input))]
    else:
        shapes = []
    layer = caffe_pb2.LayerParameter(name="input", type="Input", top=list(net.input))
    for dims in shapes:
        layer.input_param.shape.add().dim.extend(dims)
    layers = [layer, *net.layer]
    net.ClearField("layer")
    net.layer.extend(layers)
    for name in ("input", "input_dim", "input_shape"):
        net.ClearField(name)
    return True


def upgrade_batch_norm(net: caffe_pb2.NetParameter) -> bool:
    """caffe: UpgradeNetBatchNorm -- a BatchNorm with 3 param specs (the old definition) gets lr/decay mult 0."""
    done = False
    for lp in net.layer:
        if lp.type == "BatchNorm" and len(lp.param) == 3:
            if any(s.lr_mult != 0 or s.decay_mult != 0 for s in lp.param):
                done = True
            for s in lp.param:
                s.lr_mult = s.decay_mult = 0.0
    return done


_STEPS = (
    ("V0LayerParameter -> V1", upgrade_v0),
    ("data transformation fields -> transform_param", upgrade_data_transform),
    ("V1LayerParameter 'layers' -> 'layer'", upgrade_v1),
    ("input fields -> Input layer", upgrade_input),
    ("BatchNorm param lr_mult/decay_mult -> 0", upgrade_batch_norm),
)


def upgrade_net(net: caffe_pb2.NetParameter, source: str = "net") -> list[str]:
    """caffe: UpgradeNetAsNeeded -- upgrade ``net`` in place; returns (and logs, in one line) what was upgraded.

    Raises ValueError naming ``source`` for what cannot be upgraded faithfully.
    """
    done = []
    for what, step in _STEPS:
        try:
            if step(net):
                done.append(what)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    if done:
        log.info("Upgraded %s: %s", source, "; ".join(done))
    return done


_SOLVER_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}


def upgrade_solver(solver: caffe_pb2.SolverParameter, source: str = "solver") -> bool:
    """caffe: UpgradeSolverType -- the deprecated ``solver_type`` enum -> the ``type`` string."""
    if not solver.HasField("solver_type"):
        return False
    if solver.HasField("type"):
        # caffe: "old solver_type field (enum) and new type field (string) cannot be both specified"
        raise ValueError(f"{source}: give solver_type (deprecated) or type, not both")
    solver.type = _SOLVER_TYPES[solver.solver_type]
    solver.ClearField("solver_type")
    log.info("Upgraded %s: solver_type (enum) -> type '%s'", source, solver.type)
    return True
