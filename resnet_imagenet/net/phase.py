"""Caffe's phase filter: which layers of a net prototxt a TRAIN or TEST net keeps (Net::FilterNet)."""

from __future__ import annotations

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError


def _state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    # caffe: Net::StateMeetsRule (net.cpp)
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def filter_net(
    net: caffe_pb2.NetParameter, phase: int, level: int = 0, stages: tuple[str, ...] = ()
) -> caffe_pb2.NetParameter:
    """Return a copy of ``net`` keeping the layers whose include/exclude rules admit this state.

    caffe: Net::FilterNet -- a layer with include rules is kept if ANY rule is met; a layer with
    exclude rules is dropped if ANY rule is met; having both kinds is an error.
    """
    # caffe: Net::Init -- the prototxt's own `state` (its stages) is kept; phase, level and stages add to it
    state = caffe_pb2.NetState()
    state.CopyFrom(net.state)
    state.phase, state.level = phase, level
    state.stage.extend(s for s in stages if s not in state.stage)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layer")
    for layer in net.layer:
        if layer.include and layer.exclude:
            raise PrototxtError(f"layer '{layer.name}': specify either include rules or exclude rules, not both")
        keep = not layer.include
        for rule in layer.exclude:
            if _state_meets_rule(state, rule):
                keep = False
        for rule in layer.include:
            if _state_meets_rule(state, rule):
                keep = True
        if keep:
            out.layer.add().CopyFrom(layer)
    out.state.CopyFrom(state)
    return out
