"""prune/graph.py: prunable pairs and residual sums, found from the blob graph."""

from __future__ import annotations

import pytest
import torch
from _prune_nets import TINY, two_blocks_net

from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text
from resnet_imagenet.prune.graph import find_pairs, find_residual_sum, residual_affine


@pytest.fixture(scope="module")
def two_blocks():
    """(net, fitting inputs, held-out inputs) of the fixed 2-block bottleneck net."""
    return two_blocks_net()


def test_pairs_of_a_resnet_are_the_inner_bottleneck_convs():
    net = load_net(TINY, phase="test")
    pairs = find_pairs(net)
    blocks = ["res2a", "res2b", "res3a", "res4a"]
    assert [(p.conv, p.next) for p in pairs] == [
        (f"{b}_branch2{x}", f"{b}_branch2{y}") for b in blocks for x, y in (("a", "b"), ("b", "c"))
    ]
    assert pairs[0].chain == ["bn2a_branch2a", "scale2a_branch2a", "res2a_branch2a_relu"]


def test_pairs_of_plain_chains_follow_blobs_not_names():
    net = caffe_pb2.NetParameter()
    parse_text(
        """
        layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
        layer { name: "x1" type: "Convolution"
                bottom: "data" top: "t1" convolution_param { num_output: 6 kernel_size: 3 } }
        layer { name: "n1" type: "BatchNorm" bottom: "t1" top: "t1" }
        layer { name: "s1" type: "Scale" bottom: "t1" top: "t1" scale_param { bias_term: true } }
        layer { name: "r1" type: "ReLU" bottom: "t1" top: "u1" }
        layer { name: "x2" type: "Convolution"
                bottom: "u1" top: "t2" convolution_param { num_output: 6 kernel_size: 1 } }
        layer { name: "r2" type: "ReLU" bottom: "t2" top: "t2" }
        layer { name: "x3" type: "Convolution"
                bottom: "t2" top: "t3" convolution_param { num_output: 4 kernel_size: 1 } }
        layer { name: "x4" type: "Convolution"
                bottom: "t2" top: "t4" convolution_param { num_output: 4 kernel_size: 1 } }
        layer { name: "sum" type: "Eltwise" bottom: "t3" bottom: "t4" top: "t5" }
        layer { name: "x5" type: "Convolution"
                bottom: "t5" top: "t6"
                convolution_param { num_output: 4 kernel_size: 1 group: 2 } }
        layer { name: "x6" type: "Convolution"
                bottom: "t6" top: "t7" convolution_param { num_output: 2 kernel_size: 1 } }
        """,
        net,
    )
    pairs = find_pairs(load_net(net))
    # x2 feeds two convs, x3/x4 an Eltwise, x5 is grouped, x6 is last: only x1 -> x2 is prunable.
    assert [(p.conv, p.next, p.chain, p.channels) for p in pairs] == [("x1", "x2", ["n1", "s1", "r1"], 6)]


def test_residual_affine_maps_branch2c_to_the_block_sum(two_blocks):
    net, x, _ = two_blocks
    res = find_residual_sum(net, "b_2c")
    assert (res.eltwise, res.main, res.affine) == ("b", 1, ["b_2c_bn", "b_2c_scale"])
    assert find_residual_sum(net, "b_2b") is None  # a ReLU, then a conv: no residual sum
    scale, shift = residual_affine(net, res, 8)
    pre = {}  # the conv's own output (its blob is overwritten in place by BatchNorm and Scale)
    h = net.layers["b_2c"].register_forward_hook(lambda _m, _i, o: pre.setdefault("y", o.clone()))
    with torch.no_grad():
        out = net(x, blobs=["a_out", "b"])
    h.remove()
    want = pre["y"] * scale.float().view(1, -1, 1, 1) + shift.float().view(1, -1, 1, 1) + out["a_out"]
    torch.testing.assert_close(want, out["b"], atol=1e-4, rtol=1e-4)
