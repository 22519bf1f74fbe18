"""A net's outputs in Caffe's order, and deploy nets from train_val nets with every kind of data layer."""

from __future__ import annotations

import pytest
import torch

from resnet_imagenet.net.deploy import deploy_from
from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError, parse_text, read_net

UNSORTED = """
name: "order"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "z" type: "ReLU" bottom: "x" top: "zeta" }
layer { name: "m" type: "TanH" bottom: "zeta" top: "mu" }
layer { name: "a" type: "Sigmoid" bottom: "zeta" top: "alpha" }
layer { name: "B" type: "AbsVal" bottom: "x" top: "Beta" }
"""


def test_outputs_are_listed_by_name_as_caffe_does():
    # caffe: net.cpp Init -- the unconsumed blobs are a std::set<string>: byte order, capitals first
    net = load_net(parse_text(UNSORTED, caffe_pb2.NetParameter()))
    assert net.output_names == ["Beta", "alpha", "mu"]
    assert list(net(torch.zeros(2, 3))) == ["Beta", "alpha", "mu"]


def _train_val(data_layer: str) -> caffe_pb2.NetParameter:
    return parse_text(
        f"""name: "tv"
        {data_layer}
        layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" param {{ name: "w" lr_mult: 1 }}
          param {{ lr_mult: 2 }} inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
        layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
        layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include {{ phase: TEST }} }}
        """,
        caffe_pb2.NetParameter(),
    )


@pytest.mark.parametrize(
    "data_layer",
    [
        'layer { name: "data" type: "HDF5Data" top: "data" top: "label" '
        'hdf5_data_param { source: "list.txt" batch_size: 10 } }',
        'layer { name: "data" type: "DummyData" top: "data" top: "label" '
        "dummy_data_param { shape { dim: 10 dim: 4 } shape { dim: 10 } } }",
        'layer { name: "data" type: "Data" top: "data" top: "label" data_param { source: "db" batch_size: 10 } }',
    ],
)
def test_deploy_net_has_an_input_for_every_kind_of_data_layer(data_layer):
    deploy = deploy_from(_train_val(data_layer), (1, 4))
    assert [(lp.name, lp.type) for lp in deploy.layer] == [("data", "Input"), ("ip", "InnerProduct"),
                                                          ("prob", "Softmax")]  # fmt: skip
    assert list(deploy.layer[0].input_param.shape[0].dim) == [1, 4]
    # the multipliers and fillers go; a param name stays (the blob may be shared), trailing empty specs go
    assert [s.name for s in deploy.layer[1].param] == ["w"] and not deploy.layer[1].param[0].HasField("lr_mult")
    assert not deploy.layer[1].inner_product_param.HasField("weight_filler")
    net = load_net(deploy)
    assert net.output_names == ["prob"] and net.input_shapes == {"data": (1, 4)}


def test_deploy_of_bvlc_siamese_keeps_both_towers_sharing(bvlc_dir):
    deploy = deploy_from(read_net(bvlc_dir / "examples/siamese/mnist_siamese_train_test.prototxt"), (1, 2, 28, 28))
    types = [lp.type for lp in deploy.layer]
    assert types[0] == "Input" and "ContrastiveLoss" not in types and "prob" not in [lp.name for lp in deploy.layer]
    net = load_net(deploy)
    assert net.output_names == ["feat", "feat_p"]
    assert net.layers["conv1_p"].weight is net.layers["conv1"].weight
    out = net(torch.rand(1, 2, 28, 28))
    assert out["feat"].shape == (1, 2)


def test_deploy_refuses_a_second_data_layer():
    two = (
        'layer { name: "data" type: "DummyData" top: "data" top: "label" '
        "dummy_data_param { shape { dim: 10 dim: 4 } shape { dim: 10 } } }"
        'layer { name: "more" type: "DummyData" top: "more" dummy_data_param { shape { dim: 10 } } }'
    )
    tv = _train_val(two)
    with pytest.raises(PrototxtError, match="layer 'more': a second data layer"):
        deploy_from(tv, (1, 4))
