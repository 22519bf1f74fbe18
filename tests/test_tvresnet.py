"""torchvision's ResNets both ways, on randomly initialised torchvision models (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from resnet_imagenet.cli import main
from resnet_imagenet.net.export import rel_error
from resnet_imagenet.net.net import load_net
from resnet_imagenet.net.resnet import resnet
from resnet_imagenet.net.tvresnet import MEAN_RGB, STD_RGB, from_torchvision, mean_bgr_255, to_torchvision
from resnet_imagenet.proto.text import read_net, to_text


def tv_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """torchvision ``arch`` (10 classes) with random weights and random BatchNorm statistics and affines."""
    torch.manual_seed(seed)
    m = getattr(torchvision.models, arch)(num_classes=10).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.0)
                mod.bias.uniform_(-0.2, 0.2)
    return m


def same_image(n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(torchvision's input, ours) of the same random RGB uint8 images: RGB/255 normalized; BGR minus the mean."""
    img = torch.randint(0, 256, (n, 224, 224, 3), generator=torch.Generator().manual_seed(seed)).float()
    x_tv = ((img / 255 - torch.tensor(MEAN_RGB)) / torch.tensor(STD_RGB)).permute(0, 3, 1, 2)
    x_ours = (img.flip(-1) - torch.tensor(mean_bgr_255())).permute(0, 3, 1, 2)
    return x_tv, x_ours


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_import_equals_torchvision_and_round_trips(arch):
    model = tv_model(arch)
    _, _, net = from_torchvision(arch, model.state_dict())
    x_tv, x_ours = same_image()
    with torch.no_grad():
        want = model(x_tv)
        assert rel_error(net(x_ours, blobs=["fc10"])["fc10"], want) < 1e-5
        back = getattr(torchvision.models, arch)(num_classes=10).eval()
        back.load_state_dict(to_torchvision(net, torch.tensor([255 * s for s in STD_RGB])), strict=True)
        assert rel_error(back(x_tv), want) < 1e-5
        plain = getattr(torchvision.models, arch)(num_classes=10).eval()
        plain.load_state_dict(to_torchvision(net), strict=True)  # no input fold: takes our input
        assert rel_error(plain(x_ours), want) < 1e-5


def test_kaiming_layout_differs_and_v15_is_torchvision_layout():
    def convs(key):
        layers = resnet(key, False).layer
        strides = {lp.name: lp.convolution_param.stride[0] for lp in layers if lp.type == "Convolution"}
        pool1 = next(lp.pooling_param for lp in layers if lp.name == "pool1")
        return strides, (pool1.pad, pool1.round_mode)

    for depth in (50, 101, 152):  # bottlenecks: the stride moves from branch2a to branch2b
        (k, kp), (v, vp) = convs(f"resnet_{depth}"), convs(f"resnet_{depth}_v15")
        assert k.keys() == v.keys()
        moved = {n for n in k if k[n] != v[n]}
        assert moved == {f"res{s}a_branch2{p}" for s in (3, 4, 5) for p in "ab"}
        assert all(k[f"res{s}a_branch2a"] == 2 and v[f"res{s}a_branch2b"] == 2 for s in (3, 4, 5))
        assert (kp, vp) == ((0, 0), (1, 1))  # Kaiming: pad 0, CEIL; torchvision: pad 1, FLOOR
    (k, kp), (v, vp) = convs("resnet_18"), convs("resnet_18_v15")
    assert k == v and kp != vp  # basic blocks stride their first 3x3 in both: only pool1 differs


def test_export_command_and_kaiming_layout_refused(tmp_path, capsys):
    _, deploy, net = from_torchvision("resnet50", tv_model("resnet50").state_dict())
    weights = tmp_path / "r50.caffemodel"
    net.save_caffemodel(weights)
    v15 = tmp_path / "v15.prototxt"
    v15.write_text(to_text(deploy))
    kaiming = tmp_path / "kaiming.prototxt"  # the same layers and weights, Kaiming's stride and pool1 placement
    kaiming.write_text(to_text(resnet("resnet_50", False, 10)))
    base = ["export", "--weights", str(weights), "--format", "torchvision"]
    out = tmp_path / "r50.pth"
    assert main([*base, "--model", str(v15), "--out", str(out), "--mean-value", "103.53,116.28,123.675"]) == 0
    model = torchvision.models.resnet50(num_classes=10).eval()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x_tv, x_ours = same_image()
    with torch.no_grad():
        assert rel_error(model(x_tv), net(x_ours, blobs=["fc10"])["fc10"]) < 1e-5
    capsys.readouterr()
    bad = tmp_path / "kaiming.pth"
    assert main([*base, "--model", str(kaiming), "--out", str(bad)]) != 0
    assert "export the zoo's _v15 nets" in capsys.readouterr().err and not bad.exists()
    assert main([*base, "--model", str(v15), "--out", str(bad), "--mean-value", "104,117,123"]) != 0
    assert "folds only torchvision's own mean" in capsys.readouterr().err and not bad.exists()


def test_import_torchvision_command(tmp_path, capsys):
    model = tv_model("resnet18")
    sd = tmp_path / "r18.pth"
    torch.save(model.state_dict(), sd)
    out = tmp_path / "r18"
    assert main(["import_torchvision", "--arch", "resnet18", "--weights", str(sd), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["deploy.prototxt", "resnet18.caffemodel", "train_val.prototxt"]
    tv = read_net(out / "train_val.prototxt")
    data = [lp for lp in tv.layer if lp.type == "Data"]
    assert all(list(lp.transform_param.mean_value) == pytest.approx(mean_bgr_255()) for lp in data)
    assert not any(lp.transform_param.HasField("mean_file") for lp in data)
    net = load_net(out / "deploy.prototxt", out / "resnet18.caffemodel")
    x_tv, x_ours = same_image()
    with torch.no_grad():
        assert rel_error(net(x_ours, blobs=["fc10"])["fc10"], model(x_tv)) < 1e-5
    capsys.readouterr()
    assert main(["import_torchvision", "--arch", "resnet50", "--weights", str(sd), "--out", str(tmp_path / "x")]) != 0
    assert "state dict" in capsys.readouterr().err and not (tmp_path / "x").exists()
