"""summary on the zoo nets: exact parameter and MAC counts and Caffe's shapes (net/cost.py)."""

from __future__ import annotations

import re
from pathlib import Path

from resnet_imagenet import cli
from resnet_imagenet.net.cost import summarize

ZOO = Path(__file__).resolve().parents[1] / "prototxt_like"


def _resnet50_macs() -> int:
    """ResNet-50's multiply-accumulates at 224x224 by hand, Kaiming's layout (stride on branch2a)."""
    macs = 112 * 112 * 64 * (3 * 7 * 7)  # conv1 -> 112x112; pool1 (ceil) -> 56x56
    cin = 64
    for n, w, s in ((3, 64, 56), (4, 128, 28), (6, 256, 14), (3, 512, 7)):  # blocks, width, output size
        hw = s * s
        macs += hw * (w * cin + 4 * w * cin)  # res?a_branch2a (stride 2 on 1x1 except res2a) and branch1
        macs += hw * (w * w * 9 + 4 * w * w)  # res?a_branch2b, _branch2c
        macs += (n - 1) * hw * (w * 4 * w + w * w * 9 + 4 * w * w)  # identity blocks: 2a, 2b, 2c
        cin = 4 * w
    return macs + 2048 * 1000  # fc1000


def test_resnet50_parameters_macs_and_pool1() -> None:
    s = summarize(ZOO / "resnet_50" / "deploy.prototxt")
    # torchvision's resnet50 has 25,557,032; Caffe's conv1 adds a 64-element bias.
    assert s.params == 25_557_096
    assert s.macs == _resnet50_macs() == 3_857_973_248  # ~3.86 GMACs (torchvision's stride-on-3x3: 4.09 G)
    assert s.layer("conv1").params == 64 * 3 * 7 * 7 + 64
    assert s.layer("pool1").top_shapes == [(1, 64, 56, 56)]  # caffe: pooling rounds up, 112 -> 56
    assert s.layer("pool5").top_shapes == [(1, 2048, 1, 1)]
    assert s.layer("bn_conv1").params == 0 and s.layer("scale_conv1").params == 128


def test_resnet32_pool5_and_fc1000(reference_dir: Path) -> None:
    s = summarize(ZOO / "resnet_32" / "train_val.prototxt", phase="train", batch=32)
    assert s.layer("pool5").top_shapes == [(32, 256, 8, 8)]
    assert s.layer("fc1000").params == 16_384 * 1000 + 1000
    assert s.params == 20_722_280
    # Every top shape Caffe printed while setting up resnet-imagenet-caffe's ResNet-32 TRAIN net.
    log = next((reference_dir / "resnet-imagenet-caffe/resnet_32/logs").glob("*.log")).read_text()
    caffe: dict[str, list[tuple[int, ...]]] = {}
    for name, block in re.findall(r"Setting up (\S+)\n((?:.*Top shape: .*\n)+)", log):
        if name in caffe:
            break  # the TEST net follows
        caffe[name] = [tuple(map(int, m.split())) for m in re.findall(r"Top shape: ([\d ]+?) \(", block)]
    ours = {x.name: x.top_shapes for x in s.layers}
    common = [n for n in caffe if n in ours]
    assert len(common) >= 130 and "pool5" in common
    assert {n: ours[n] for n in common} == {n: caffe[n] for n in common}


def test_batch_scales_shapes_and_macs() -> None:
    one = summarize(ZOO / "resnet_tiny" / "deploy.prototxt", batch=1)
    three = summarize(ZOO / "resnet_tiny" / "deploy.prototxt", batch=3)
    assert one.params == three.params == 132_202
    assert three.macs == 3 * one.macs
    assert three.layer("pool1").top_shapes == [(3, 16, 16, 16)]  # 32 -> 16: (32 - 3) / 2 rounded up, + 1


def test_alexnet_parameters() -> None:
    s = summarize(ZOO / "alexnet" / "deploy.prototxt")
    assert s.params == 60_965_224  # bvlc_alexnet
    assert s.layer("conv2").params == 256 * 48 * 5 * 5 + 256  # group 2: each filter sees 96 / 2 channels
    assert s.layer("pool5").top_shapes == [(1, 256, 6, 6)]


def test_summary_command(capsys) -> None:
    assert cli.main(["summary", "--model", str(ZOO / "resnet_tiny" / "train_val.prototxt"), "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "Total learnable parameters: 132,202" in out
    assert re.search(r"^pool1\s+Pooling\s+2x16x16x16\s", out, re.M)
