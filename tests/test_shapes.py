"""Caffe's data-layer top shapes from the first record (data/shapes.py), ImageData's is_color, rand_skip."""

from __future__ import annotations

import cv2
import lmdb
import numpy as np
import pytest

from resnet_imagenet.data.datum import encode_datum
from resnet_imagenet.data.feed import DataFeed
from resnet_imagenet.data.shapes import data_input_shapes
from resnet_imagenet.net.net import load_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError, parse_text
from resnet_imagenet.train.setup import load_data_net

NET = """
layer {{ name: "data" type: "{type}" top: "data" top: "label" transform_param {{ {transform} }} {param} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param {{ num_output: 2 }} }}
"""


def _lmdb(path, images) -> None:
    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i, img in enumerate(images):
            txn.put(f"{i:08d}".encode(), encode_datum(img, i))
    env.close()


def _net(type_: str, param: str, transform: str = "") -> caffe_pb2.NetParameter:
    return parse_text(NET.format(type=type_, param=param, transform=transform), caffe_pb2.NetParameter())


def test_data_shape_and_channels_from_the_first_datum(tmp_path) -> None:
    _lmdb(tmp_path / "gray", [np.zeros((5, 7, 1), np.uint8)] * 3)  # convert_imageset --gray
    net = _net("Data", 'data_param { source: "gray" batch_size: 4 }')
    assert data_input_shapes(net.layer, tmp_path) == {"data": (4, 1, 5, 7), "label": (4,)}
    assert load_data_net(net, base_dir=tmp_path).layers["fc"].weight.shape == (2, 35)
    colour = _net("Data", 'data_param { source: "gray" batch_size: 4 }', "crop_size: 3 force_color: true")
    assert data_input_shapes(colour.layer, tmp_path)["data"] == (4, 3, 3, 3)
    with pytest.raises(PrototxtError, match="layer 'data': the input size comes from the first record"):
        load_net(net)  # net/ alone cannot read records


def test_image_data_is_color_and_new_size(tmp_path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.full((6, 9), 50, np.uint8))  # a gray first image
    cv2.imwrite(str(tmp_path / "b.png"), np.full((6, 9, 3), 90, np.uint8))
    (tmp_path / "list.txt").write_text("a.png 0\nb.png 1\n")
    net = _net("ImageData", 'image_data_param { source: "list.txt" batch_size: 2 }')
    # caffe: is_color defaults to true -- a gray first image still gives 3 channels
    assert data_input_shapes(net.layer, tmp_path)["data"] == (2, 3, 6, 9)
    with DataFeed(net.layer[0], "test", num_workers=0, base_dir=tmp_path) as feed:
        x, _ = feed.next()
    assert tuple(x.shape) == (2, 3, 6, 9) and x[0].eq(50).all()
    gray = _net("ImageData", 'image_data_param { source: "list.txt" batch_size: 2 is_color: false }')
    assert data_input_shapes(gray.layer, tmp_path)["data"] == (2, 1, 6, 9)
    resized = _net("ImageData", 'image_data_param { source: "x" batch_size: 2 new_height: 4 new_width: 5 }')
    assert load_net(resized).input_shapes["data"] == (2, 3, 4, 5)  # known from the parameters alone


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rand_skip_starts_the_stream_at_a_random_record(tmp_path, seed) -> None:
    _lmdb(tmp_path / "db", [np.full((2, 2, 3), i, np.uint8) for i in range(10)])
    layer = _net("Data", 'data_param { source: "db" batch_size: 2 rand_skip: 6 }').layer[0]
    skip = int(np.random.default_rng([seed, 2]).integers(0, 6))  # caffe: caffe_rng_rand() % rand_skip
    with DataFeed(layer, "test", seed=seed, num_workers=0, base_dir=tmp_path) as feed:
        assert feed.next()[1].tolist() == [skip, skip + 1]
    layer.data_param.ClearField("rand_skip")
    with DataFeed(layer, "test", seed=seed, num_workers=0, base_dir=tmp_path) as feed:
        assert feed.next()[1].tolist() == [0, 1]
    assert {int(np.random.default_rng([s, 2]).integers(0, 6)) for s in range(3)} != {0}  # the test can fail
