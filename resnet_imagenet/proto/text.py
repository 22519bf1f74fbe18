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

from resnet_imagenet.proto import caffe_pb2, upgrade

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
    """Read a net prototxt, upgraded as Caffe does (V0/V1 layers, input fields, transform fields, BatchNorm)."""
    net = read_message(path, caffe_pb2.NetParameter())
    upgrade_net(net, str(path))
    return net


def read_solver(path: str | os.PathLike) -> caffe_pb2.SolverParameter:
    """Read a solver prototxt, moving the deprecated ``solver_type`` enum into ``type``."""
    solver = read_message(path, caffe_pb2.SolverParameter())
    try:
        upgrade.upgrade_solver(solver, str(path))
    except ValueError as e:
        raise PrototxtError(str(e)) from None
    return solver


def to_text(message: Message) -> str:
    # protobuf >= 7 has no float_format; its default prints float32 fields in their shortest round-trip form.
    return text_format.MessageToString(message)


def upgrade_net(net: caffe_pb2.NetParameter, source: str | None = None) -> list[str]:
    """Apply Caffe's upgrades to ``net`` in place (proto/upgrade.py: V0, V1, input fields, data transformation
    fields, BatchNorm params); returns what was upgraded. Errors are PrototxtErrors naming ``source``."""
    try:
        return upgrade.upgrade_net(net, source or f"net '{net.name}'")
    except ValueError as e:
        raise PrototxtError(str(e)) from None


def parse_phase(phase: str | int) -> int:
    """'train'/'TRAIN'/0 -> TRAIN, 'test'/'TEST'/1 -> TEST."""
    if isinstance(phase, int):
        if phase in (TRAIN, TEST):
            return phase
    elif phase.upper() in ("TRAIN", "TEST"):
        return caffe_pb2.Phase.Value(phase.upper())
    raise ValueError(f"phase must be 'train' or 'test', not {phase!r}")
