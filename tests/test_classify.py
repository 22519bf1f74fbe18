"""``classify``: labels files, preprocessing geometry, exact scores on lossless images, ten-crop, bad images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from resnet_imagenet import cli
from resnet_imagenet.proto.blob import write_blobproto
from resnet_imagenet.tools.classify import Classifier, load_labels, parse_mean

DEPLOY = """
name: "colours"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture()
def colour_net(tmp_path):
    """A deploy net whose class c scores the mean of BGR channel c over the 8x8 crop / 40: blue, green, red."""
    from resnet_imagenet.net.net import load_net

    model = tmp_path / "deploy.prototxt"
    model.write_text(DEPLOY)
    net = load_net(model)
    w = torch.zeros(3, 3, 8, 8)
    for c in range(3):
        w[c, c] = 1 / 64 / 40
    with torch.no_grad():
        net.layers["fc"].weight.copy_(w.view(3, -1))
        net.layers["fc"].bias.zero_()
    net.save_caffemodel(tmp_path / "w.caffemodel")
    (tmp_path / "labels.txt").write_text("blue\ngreen\nred\n")
    return model, tmp_path / "w.caffemodel", tmp_path / "labels.txt"


def _softmax(z):
    e = np.exp(np.asarray(z, np.float64) - max(z))
    return e / e.sum()


def test_load_labels(tmp_path) -> None:
    syn = tmp_path / "synset_words.txt"
    syn.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n\n")
    assert load_labels(syn, 2) == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    plain = tmp_path / "classes.txt"
    plain.write_text("disc\nsquare ring\n")  # convert_imageset's class list: one name per line
    assert load_labels(plain, 3) == ["disc", "square ring", "class 2"]
    assert load_labels(None, 3) == ["class 0", "class 1", "class 2"]
    shipped = load_labels(None, 1000)
    assert len(shipped) == 1000 and shipped[0] == "tench, Tinca tinca"
    assert shipped[388] == "giant panda, panda, panda bear, coon bear, Ailuropoda melanoleuca"
    assert shipped[999] == "toilet tissue, toilet paper, bathroom tissue"


def test_shipped_synset_words_format() -> None:
    from resnet_imagenet.tools.classify import default_labels_path

    lines = default_labels_path().read_text().splitlines()
    wnids = [line.split()[0] for line in lines]
    assert len(lines) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert lines[0] == "n01440764 tench, Tinca tinca" and lines[517] == "n03126707 crane"


def test_parse_mean(tmp_path) -> None:
    assert parse_mean("104,117,123", 3).ravel().tolist() == [104, 117, 123]
    assert parse_mean("128", 3).shape == (3, 1, 1)
    with pytest.raises(ValueError, match="2 values for 3 channels"):
        parse_mean("1,2", 3)
    write_blobproto(np.ones((1, 3, 5, 5), np.float32), tmp_path / "m.binaryproto", legacy=True)
    assert parse_mean(tmp_path / "m.binaryproto", 3).shape == (3, 5, 5)
    with pytest.raises(ValueError, match="does not fit 1-channel data"):
        parse_mean(tmp_path / "m.binaryproto", 1)


def test_geometry(colour_net, tmp_path) -> None:
    model, weights, _ = colour_net
    img = np.zeros((10, 20, 3), np.uint8)
    ok, buf = cv2.imencode(".png", img)
    clf = Classifier(model, weights)
    assert clf.preprocess(buf.tobytes()).shape == (1, 3, 9, 18)  # shorter side 8 * 256 / 224 -> 9, aspect kept
    write_blobproto(np.zeros((1, 3, 12, 11), np.float32), tmp_path / "full.binaryproto")
    clf = Classifier(model, weights, mean=tmp_path / "full.binaryproto")
    assert clf.preprocess(buf.tobytes()).shape == (1, 3, 12, 11)  # a full-size mean: the training images' size
    write_blobproto(np.zeros((1, 3, 8, 8), np.float32), tmp_path / "crop.binaryproto")
    clf = Classifier(model, weights, mean=tmp_path / "crop.binaryproto")
    assert clf.preprocess(buf.tobytes()).shape == (1, 3, 9, 18)  # a crop-sized mean: the usual geometry


def test_exact_scores_bgr_and_mean(colour_net, tmp_path, capsys) -> None:
    model, weights, labels = colour_net
    img = np.empty((30, 40, 3), np.uint8)
    img[:] = (200, 10, 90)  # B, G, R: lossless PNG, constant so resizing keeps the values
    cv2.imwrite(str(tmp_path / "bluish.png"), img)
    assert cli.main(["classify", "--model", str(model), "--weights", str(weights), "--labels", str(labels),
                     "--mean", "104,117,123", str(tmp_path / "bluish.png")]) == 0  # fmt: skip
    p = _softmax([(200 - 104) / 40, (10 - 117) / 40, (90 - 123) / 40])
    assert capsys.readouterr().out.splitlines() == [
        str(tmp_path / "bluish.png"),
        f"blue (score = {p[0]:.5f})",
        f"red (score = {p[2]:.5f})",
        f"green (score = {p[1]:.5f})",
    ]


def test_ten_crop_averages_corners_centre_and_mirrors(colour_net, tmp_path) -> None:
    model, weights, labels = colour_net
    img = np.zeros((9, 9, 3), np.uint8)  # 9x9: no resize for an 8x8 input (8 * 256 / 224 -> 9)
    img[..., 0] = 255  # blue everywhere ...
    img[4, 4] = (0, 0, 255)  # ... but a red centre pixel, inside every crop
    img[0, 0] = (0, 255, 0)  # a green corner pixel, only in the top-left crop (and its mirror)
    cv2.imwrite(str(tmp_path / "x.png"), img)
    centre = Classifier(model, weights, labels=labels).classify(tmp_path / "x.png")
    ten = Classifier(model, weights, labels=labels, ten_crop=True).classify(tmp_path / "x.png")
    x = img.transpose(2, 0, 1).astype(np.float64)
    want_centre = _softmax(x[:, 0:8, 0:8].mean((1, 2)) / 40)  # centre offset (9 - 8) // 2 = 0
    crops = [x[:, h : h + 8, w : w + 8] for h, w in [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0)]]
    want_ten = sum(_softmax(c.mean((1, 2)) / 40) for c in crops) * 2 / 10  # a mirror keeps a crop's channel means
    assert {n: s for _, n, s in centre.top} == pytest.approx(dict(zip(["blue", "green", "red"], want_centre)))
    assert {n: s for _, n, s in ten.top} == pytest.approx(dict(zip(["blue", "green", "red"], want_ten)))
    assert dict((n, s) for _, n, s in ten.top)["green"] < dict((n, s) for _, n, s in centre.top)["green"]


def test_bad_images_one_line_each_others_run(colour_net, tmp_path, capsys) -> None:
    model, weights, labels = colour_net
    good = tmp_path / "good.jpg"
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 2] = 250
    cv2.imwrite(str(good), img)
    (tmp_path / "bad.jpg").write_bytes(good.read_bytes()[:20])  # truncated JPEG
    (tmp_path / "empty.jpg").write_bytes(b"")
    args = ["classify", "--model", str(model), "--weights", str(weights), "--labels", str(labels), "--mean", "none"]
    paths = [tmp_path / "bad.jpg", good, tmp_path / "missing.jpg", tmp_path / "empty.jpg", good]
    assert cli.main(args + [str(p) for p in paths]) == 1
    cap = capsys.readouterr()
    out = cap.out.splitlines()
    assert out[0] == str(good) and out[1].startswith("red (score = ") and out[4] == str(good) and len(out) == 8
    err = cap.err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("resnet-imagenet classify: error: ") for line in err)
    assert "bad.jpg" in err[0] and "missing.jpg" in err[1] and "empty.jpg" in err[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without GPUs")
def test_gpu_flag_is_parsed_as_train_parses_it(colour_net) -> None:
    model, weights, _ = colour_net
    assert Classifier(model, weights, gpu="cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match="--gpu all: no GPU is visible"):  # was: invalid literal for int()
        Classifier(model, weights, gpu="all")
    with pytest.raises(ValueError, match="GPU 0 does not exist"):
        Classifier(model, weights, gpu="0")
