"""Prototxt (protobuf text format) reading and writing, and Caffe's legacy upgrades (phase filtering: net/phase.py).

The prototxt is the experiment's config. Parsing is strict: an unknown field is an error that
names the file, line and field, because a silently ignored typo (``lr_mult`` in the wrong block,
``stepsize`` spelled ``step_size``) costs a week of GPU time.
"""

from __future__ import annotations

import os
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import Message

from resnet_imagenet.proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST
DATA_LAYER_TYPES = ("Data", "ImageData", "Input", "MemoryData")


class PrototxtError(ValueError):
    """A prototxt that does not parse or does not describe a valid net; the message names the place."""


def parse_text(text: str, message: Message, source: str = "<string>") -> Message:
    """Parse protobuf text ``text`` into ``message``; errors name ``source``, line and column."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        # ParseError's own text starts with "line:col : "; keep only the explanation.
        msg = str(e).split(" : ", 1)[-1] if line is not None else str(e)
        where = f"{source}:{line}:{col}" if line is not None else source
        raise PrototxtError(f"{where}: {msg}") from None
    return message


def read_message(path: str | os.PathLike, message: Message) -> Message:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PrototxtError(f"{path}: cannot read: {e.strerror}") from None
    return parse_text(text, message, str(path))


def read_net(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """Read a net prototxt, upgrading legacy input fields and data-layer transform fields."""
    net = read_message(path, caffe_pb2.NetParameter())
    upgrade_net(net)
    return net


def read_solver(path: str | os.PathLike) -> caffe_pb2.SolverParameter:
    """Read a solver prototxt, moving the deprecated ``solver_type`` enum into ``type``."""
    solver = read_message(path, caffe_pb2.SolverParameter())
    if solver.HasField("solver_type") and not solver.HasField("type"):
        # caffe: UpgradeSolverType (upgrade_proto.cpp) maps the enum onto the type string.
        names = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}
        solver.type = names[solver.solver_type]
        solver.ClearField("solver_type")
    return solver


def to_text(message: Message) -> str:
    # protobuf >= 7 has no float_format; its default prints float32 fields in their shortest round-trip form.
    return text_format.MessageToString(message)


def upgrade_net(net: caffe_pb2.NetParameter) -> None:
    """Apply Caffe's in-memory upgrades to ``net`` (in place).

    - caffe: UpgradeNetInput -- the deprecated ``input``/``input_dim``/``input_shape`` fields
      become an Input layer at the front.
    - caffe: UpgradeNetDataTransformation -- ``scale``/``mean_file``/``crop_size``/``mirror`` in
      data_param or image_data_param move to transform_param.
    """
    if net.input:
        shapes = []
        if net.input_shape:
            shapes = [list(s.dim) for s in net.input_shape]
        elif net.input_dim:
            if len(net.input_dim) != 4 * len(net.input):
                raise PrototxtError(
                    f"net '{net.name}': input_dim must have 4 values per input "
                    f"({len(net.input)} inputs, {len(net.input_dim)} values)"
                )
            dims = list(net.input_dim)
            shapes = [dims[4 * i : 4 * i + 4] for i in range(len(net.input))]
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        layer.top.extend(net.input)
        for dims in shapes:
            layer.input_param.shape.add().dim.extend(dims)
        layers = [layer] + list(net.layer)
        net.ClearField("layer")
        net.layer.extend(layers)
        net.ClearField("input")
        net.ClearField("input_dim")
        net.ClearField("input_shape")
    for layer in net.layer:
        for field in ("data_param", "image_data_param"):
            if not layer.HasField(field):
                continue
            p = getattr(layer, field)
            t = layer.transform_param
            for name in ("scale", "mean_file", "crop_size", "mirror"):
                if p.HasField(name):
                    setattr(t, name, getattr(p, name))
                    p.ClearField(name)


def parse_phase(phase: str | int) -> int:
    """'train'/'TRAIN'/0 -> TRAIN, 'test'/'TEST'/1 -> TEST."""
    if isinstance(phase, int):
        if phase in (TRAIN, TEST):
            return phase
    elif phase.upper() in ("TRAIN", "TEST"):
        return caffe_pb2.Phase.Value(phase.upper())
    raise ValueError(f"phase must be 'train' or 'test', not {phase!r}")
