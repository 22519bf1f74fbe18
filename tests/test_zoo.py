"""The zoo's prototxts: they parse, follow the published Caffe nets layer for layer, and cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_imagenet.net import zoo
from resnet_imagenet.net.phase import filter_net
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import DATA_LAYER_TYPES, TEST, TRAIN, parse_text, read_net, read_solver

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "prototxt_like"


def _structure(net: caffe_pb2.NetParameter) -> list[tuple]:
    """Everything that decides what a layer computes, in order; data layers (feeding) left out."""
    rows = []
    for layer in net.layer:
        if layer.type in DATA_LAYER_TYPES:
            continue
        row = [layer.name, layer.type, tuple(layer.bottom), tuple(layer.top)]
        if layer.type == "Convolution":
            p = layer.convolution_param
            row += [p.num_output, tuple(p.kernel_size), tuple(p.stride), tuple(p.pad), p.bias_term, p.group]
        elif layer.type == "Pooling":
            p = layer.pooling_param
            row += [p.pool, p.kernel_size, p.stride, p.pad, p.global_pooling]
        elif layer.type == "InnerProduct":
            row += [layer.inner_product_param.num_output, layer.inner_product_param.bias_term]
        elif layer.type == "BatchNorm":
            row += [layer.batch_norm_param.use_global_stats, [(s.lr_mult, s.decay_mult) for s in layer.param]]
        elif layer.type == "Scale":
            row += [layer.scale_param.bias_term]
        rows.append(tuple(row))
    return rows


@pytest.mark.parametrize("key", zoo.NETS)
def test_checked_in_files_parse_and_equal_the_generator(key: str, tmp_path: Path) -> None:
    zoo.write_all(tmp_path, nets=(key,))
    names = sorted(p.name for p in (tmp_path / key).iterdir())
    assert names == sorted(["train_val.prototxt", "deploy.prototxt", f"{key}_solver.prototxt"])
    for name in names:
        assert (ZOO / key / name).read_bytes() == (tmp_path / key / name).read_bytes(), (
            f"prototxt_like/{key}/{name} differs from the generator: run python -m resnet_imagenet.net.zoo"
        )
    train_val = read_net(ZOO / key / "train_val.prototxt")
    deploy = read_net(ZOO / key / "deploy.prototxt")
    solver = read_solver(ZOO / key / f"{key}_solver.prototxt")
    assert (REPO / solver.net).is_file()
    assert solver.snapshot_prefix == f"snapshots/{key}"
    # train_val minus data layers and the loss/accuracy head is the deploy net minus its input and prob.
    body = [r for r in _structure(filter_net(train_val, TEST)) if r[1] not in ("SoftmaxWithLoss", "Accuracy")]
    deploy_body = [r for r in _structure(deploy) if r[1] != "Softmax"]
    strip = {"BatchNorm": 4}  # train_val's BatchNorm has lr_mult-0 params, deploy's use_global_stats
    assert [r[: strip.get(r[1])] for r in body] == [r[: strip.get(r[1])] for r in deploy_body]


def test_resnet50_deploy_matches_kaiming_he(reference_dir: Path) -> None:
    ours = read_net(ZOO / "resnet_50" / "deploy.prototxt")
    kaiming = read_net(reference_dir / "deep-residual-networks/prototxt/ResNet-50-deploy.prototxt")
    assert [layer.name for layer in ours.layer[1:]] == [layer.name for layer in kaiming.layer[1:]]
    assert _structure(ours) == _structure(kaiming)
    assert list(ours.layer[0].input_param.shape[0].dim) == list(kaiming.layer[0].input_param.shape[0].dim)


def test_resnet50_train_val_body_matches_resnet_imagenet_caffe(reference_dir: Path) -> None:
    ours = read_net(ZOO / "resnet_50" / "train_val.prototxt")
    theirs = read_net(reference_dir / "resnet-imagenet-caffe/resnet_50/resnet_50.prototxt")

    def body(net):  # conv1 .. fc1000; the heads differ (theirs names its loss "prob", TRAIN only)
        rows = _structure(net)
        return rows[: [r[0] for r in rows].index("fc1000") + 1]

    assert body(ours) == body(theirs)
    conv1 = next(layer for layer in ours.layer if layer.name == "conv1").convolution_param
    assert conv1.weight_filler.type == "msra" and conv1.bias_term


@pytest.mark.parametrize("ref", ["deploy.prototxt", "resnet_32.prototxt"])
def test_resnet32_matches_resnet_imagenet_caffe(reference_dir: Path, ref: str) -> None:
    ours = read_net(ZOO / "resnet_32" / ("deploy.prototxt" if ref == "deploy.prototxt" else "train_val.prototxt"))
    theirs = read_net(reference_dir / "resnet-imagenet-caffe/resnet_32" / ref)
    n = [r[0] for r in _structure(theirs)].index("fc1000") + 1
    assert _structure(ours)[:n] == _structure(theirs)[:n]
    names = [layer.name for layer in ours.layer]
    assert names[names.index("res4b_relu") + 1 :][:5] == [
        "res4c_branch2a",
        "bn4c_branch2a",
        "scale4c_branch2a",
        "res4c_branch2a_relu",
        "pool5",
    ]


def test_resnet50_train_val_phases() -> None:
    net = read_net(ZOO / "resnet_50" / "train_val.prototxt")
    for phase, mirror, batch, source in ((TRAIN, True, 32, "train"), (TEST, False, 50, "val")):
        layers = filter_net(net, phase).layer
        data = layers[0]
        assert data.type == "Data" and list(data.top) == ["data", "label"]
        assert data.data_param.backend == caffe_pb2.DataParameter.LMDB
        assert data.data_param.batch_size == batch and source in data.data_param.source
        t = data.transform_param
        assert (t.crop_size, t.mirror, t.mean_file) == (224, mirror, "data/imagenet_mean.binaryproto")
        accuracy = {layer.top[0]: layer.accuracy_param.top_k for layer in layers if layer.type == "Accuracy"}
        assert accuracy == ({"accuracy@1": 1, "accuracy@5": 5} if phase == TEST else {})
        assert [(layer.name, list(layer.bottom)) for layer in layers if layer.type == "SoftmaxWithLoss"] == [
            ("loss", ["fc1000", "label"])
        ]
        bns = [layer for layer in layers if layer.type == "BatchNorm"]
        assert len(bns) == 53 and all([s.lr_mult for s in bn.param] == [0, 0, 0] for bn in bns)


def test_resnet50_solver_is_the_published_recipe(reference_dir: Path) -> None:
    ours = read_solver(ZOO / "resnet_50" / "resnet_50_solver.prototxt")
    theirs = read_solver(reference_dir / "resnet-imagenet-caffe/resnet_50/resnet_50_solver.prototxt")
    fields = "base_lr lr_policy stepsize gamma max_iter momentum weight_decay snapshot".split()
    assert [getattr(ours, f) for f in fields] == [getattr(theirs, f) for f in fields]
    assert ours.base_lr == pytest.approx(0.1) and ours.max_iter == 800000 and ours.stepsize == 200000
    assert ours.test_iter[0] * 50 == 50000


@pytest.mark.parametrize(
    ("key", "depth", "last_blocks"),
    [
        ("resnet_18", 18, ["res2b", "res3b", "res4b", "res5b"]),
        ("resnet_50", 50, ["res2c", "res3d", "res4f", "res5c"]),
        ("resnet_101", 101, ["res2c", "res3b3", "res4b22", "res5c"]),
        ("resnet_152", 152, ["res2c", "res3b7", "res4b35", "res5c"]),
    ],
)
def test_resnet_depth_and_kaiming_block_names(key: str, depth: int, last_blocks: list[str]) -> None:
    net = read_net(ZOO / key / "deploy.prototxt")
    weighted = [
        layer.name
        for layer in net.layer
        if layer.type == "InnerProduct" or (layer.type == "Convolution" and not layer.name.endswith("_branch1"))
    ]
    assert len(weighted) == depth
    eltwise = [layer.name for layer in net.layer if layer.type == "Eltwise"]
    assert [[e for e in eltwise if e.startswith(f"res{s}")][-1] for s in (2, 3, 4, 5)] == last_blocks
    if key == "resnet_18":  # basic blocks: two 3x3s; res2a keeps the identity shortcut (64 -> 64)
        assert "res2a_branch1" not in [layer.name for layer in net.layer]
        assert "res2a_branch2c" not in [layer.name for layer in net.layer]
        res3a = next(layer for layer in net.layer if layer.name == "res3a_branch2a").convolution_param
        assert (list(res3a.kernel_size), list(res3a.stride)) == ([3], [2])


def test_resnet_tiny() -> None:
    net = read_net(ZOO / "resnet_tiny" / "train_val.prototxt")
    train = filter_net(net, TRAIN).layer
    assert train[0].transform_param.crop_size == 32 and train[0].data_param.batch_size == 32
    types = [layer.type for layer in net.layer]
    assert types.count("Eltwise") == 4 and "BatchNorm" in types and "Scale" in types
    solver = read_solver(ZOO / "resnet_tiny" / "resnet_tiny_solver.prototxt")
    assert solver.max_iter <= 1000 and solver.display == 20 and solver.test_interval and solver.snapshot


def test_alexnet_is_bvlc_alexnet() -> None:
    net = read_net(ZOO / "alexnet" / "train_val.prototxt")
    convs = [(layer.name, layer.convolution_param.group) for layer in net.layer if layer.type == "Convolution"]
    assert convs == [("conv1", 1), ("conv2", 2), ("conv3", 1), ("conv4", 2), ("conv5", 2)]
    lrn = [(x.name, x.lrn_param.local_size, x.lrn_param.alpha) for x in net.layer if x.type == "LRN"]
    assert lrn == [("norm1", 5, pytest.approx(1e-4)), ("norm2", 5, pytest.approx(1e-4))]
    drop = [(layer.name, layer.dropout_param.dropout_ratio) for layer in net.layer if layer.type == "Dropout"]
    assert drop == [("drop6", 0.5), ("drop7", 0.5)]
    assert filter_net(net, TRAIN).layer[0].transform_param.crop_size == 227


def test_unknown_net_is_refused() -> None:
    with pytest.raises(ValueError, match="resnet_50"):
        zoo.generate("resnet_51")


def test_generated_text_reparses_to_the_same_message() -> None:
    net = zoo.resnet("resnet_50", train=True)
    text = zoo.generate("resnet_50")["train_val.prototxt"]
    assert parse_text(text, caffe_pb2.NetParameter()) == net
