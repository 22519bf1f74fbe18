"""torchvision's ResNets both ways: a state dict from our ResNet, and our ResNet (v1.5 zoo net) from theirs.

Names: conv1/bn_conv1+scale_conv1 <-> conv1/bn1; res<S><b>_branch2{a,b,c} <-> layer<S-1>.<i>.conv{1,2,3} (and
bn/scale <-> bn{1,2,3}); res<S><b>_branch1 <-> layer<S-1>.<i>.downsample.{0,1}; fc<N> <-> fc. Caffe's BatchNorm
stores sums and a scale factor (mean = blob / factor) and leaves the affine to Scale; torchvision's BatchNorm2d
holds both (eps 1e-5 each). Kaiming's conv1 has a bias that torchvision's lacks: it moves into bn1's mean.

Inputs: torchvision's ResNets take RGB in [0, 1] normalized by ImageNet's mean and std; ours take BGR pixels
minus a mean, times a scale. With the mean set to 255 * torchvision's (in BGR), x_tv[rgb c] = x_ours[bgr c] /
(255 * std_c * scale), a per-channel factor that conv1's zero padding respects: the channel order and the
factor fold into conv1's weights exactly.
"""

from __future__ import annotations

import torch

from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.net.resnet import RESNETS, resnet
from resnet_imagenet.proto import caffe_pb2

MEAN_RGB = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalization (torchvision.transforms docs)
STD_RGB = (0.229, 0.224, 0.225)
TV_EPS = 1e-5  # torch.nn.BatchNorm2d's default eps
ARCHS = {  # torchvision arch -> (blocks per stage, bottleneck, our zoo net of the same layout)
    "resnet18": ((2, 2, 2, 2), False, "resnet_18_v15"),
    "resnet34": ((3, 4, 6, 3), False, None),
    "resnet50": ((3, 4, 6, 3), True, "resnet_50_v15"),
    "resnet101": ((3, 4, 23, 3), True, "resnet_101_v15"),
    "resnet152": ((3, 8, 36, 3), True, "resnet_152_v15"),
}


def mean_bgr_255() -> tuple[float, float, float]:
    """torchvision's mean as our mean_value: BGR, in pixels."""
    return tuple(255.0 * m for m in reversed(MEAN_RGB))


def _blocks(net: CaffeNet) -> list[list[str]]:
    """Block (Eltwise layer) names per stage res2..res5."""
    return [[lp.name for lp in net.layer_params if lp.type == "Eltwise" and lp.name[3] == str(s)] for s in (2, 3, 4, 5)]


def detect_arch(net: CaffeNet) -> str:
    """The torchvision arch with ``net``'s blocks per stage and block type, else a ValueError."""
    blocks = tuple(len(b) for b in _blocks(net))
    bottleneck = any(lp.name.endswith("_branch2c") for lp in net.layer_params)
    for arch, (want, bn, _) in ARCHS.items():
        if (want, bn) == (blocks, bottleneck):
            return arch
    raise ValueError(f"net '{net.name}' ({blocks} blocks per stage) is none of torchvision's {', '.join(ARCHS)}")


def _pairs(net: CaffeNet) -> list[tuple[str, str, str]]:
    """(our conv, our BatchNorm suffix, torchvision prefix of conv/bn) for every conv; the fc separately."""
    out = [("conv1", "_conv1", "conv1|bn1")]
    for s, names in enumerate(_blocks(net)):
        for i, name in enumerate(names):
            tag, tv = name[3:], f"layer{s + 1}.{i}"
            for j, part in enumerate(("2a", "2b", "2c")):
                if f"{name}_branch{part}" in net.layers:
                    out.append((f"{name}_branch{part}", f"{tag}_branch{part}", f"{tv}.conv{j + 1}|{tv}.bn{j + 1}"))
            if f"{name}_branch1" in net.layers:
                out.append((f"{name}_branch1", f"{tag}_branch1", f"{tv}.downsample.0|{tv}.downsample.1"))
    return out


def _fc(net: CaffeNet) -> str:
    fcs = [lp.name for lp in net.layer_params if lp.type == "InnerProduct"]
    if len(fcs) != 1:
        raise ValueError(f"net '{net.name}': expected one InnerProduct (fc) layer, found {fcs}")
    return fcs[0]


def to_torchvision(net: CaffeNet, input_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """torchvision's state dict of ResNet ``net``. ``input_scale`` (3,), when given, is 255 * std * scale
    per RGB channel: conv1 then reads torchvision's normalized RGB input (see the module docstring)."""
    sd: dict[str, torch.Tensor] = {}
    for conv, suffix, tv in _pairs(net):
        tv_conv, tv_bn = tv.split("|")
        c, bn, sc = net.layers[conv], net.layers[f"bn{suffix}"], net.layers[f"scale{suffix}"]
        w = c.weight.detach().double()
        if conv == "conv1" and input_scale is not None:
            w = w.flip(1) * input_scale.double().reshape(1, 3, 1, 1)  # BGR -> RGB, times the per-channel factor
        sf = float(bn.scale_factor[0])
        inv = 0.0 if sf == 0 else 1.0 / sf
        mean = bn.mean.double() * inv - (c.bias.double() if c.bias is not None else 0.0)
        sd[f"{tv_conv}.weight"] = w.float()
        sd[f"{tv_bn}.weight"] = sc.weight.detach().clone()
        sd[f"{tv_bn}.bias"] = sc.bias.detach().clone()
        sd[f"{tv_bn}.running_mean"] = mean.float()
        sd[f"{tv_bn}.running_var"] = (bn.variance.double() * inv + bn.eps - TV_EPS).float()
        sd[f"{tv_bn}.num_batches_tracked"] = torch.tensor(0)
    fc = net.layers[_fc(net)]
    sd["fc.weight"], sd["fc.bias"] = fc.weight.detach().clone(), fc.bias.detach().clone()
    return sd


def from_torchvision(
    arch: str, sd: dict[str, torch.Tensor], scale: float = 1.0
) -> tuple[caffe_pb2.NetParameter, caffe_pb2.NetParameter, CaffeNet]:
    """(train_val, deploy, deploy CaffeNet with the weights) of torchvision ``arch``'s state dict ``sd``: the zoo's
    v1.5 net, mean_value = 255 * torchvision's mean (BGR), ``scale`` as transform scale; outputs equal theirs."""
    if arch not in ARCHS or ARCHS[arch][2] is None:
        known = [a for a, v in ARCHS.items() if v[2]]
        raise ValueError(f"unknown arch {arch!r} (archs: {', '.join(known)})")
    key = ARCHS[arch][2]
    if "fc.weight" not in sd:
        raise ValueError(f"not a torchvision {arch} state dict: no fc.weight")
    classes = int(sd["fc.weight"].shape[0])
    train_val, deploy = resnet(key, True, classes), resnet(key, False, classes)
    for lp in train_val.layer:
        if lp.type == "Data":
            lp.transform_param.ClearField("mean_file")
            lp.transform_param.mean_value.extend(mean_bgr_255())
            if scale != 1.0:
                lp.transform_param.scale = scale
    net = CaffeNet(deploy, caffe_pb2.TEST)
    spec = RESNETS[key]
    deploy.layer[0].input_param.shape[0].dim[:] = [1, 3, spec.crop, spec.crop]
    factor = torch.tensor([255.0 * s * scale for s in STD_RGB], dtype=torch.float64)
    with torch.no_grad():
        for conv, suffix, tv in _pairs(net):
            _load_pair(net, sd, conv, suffix, tv, factor if conv == "conv1" else None)
        fc = net.layers[_fc(net)]
        _copy(fc.weight, sd, "fc.weight")
        _copy(fc.bias, sd, "fc.bias")
    return train_val, deploy, net.eval()


def _copy(dst: torch.Tensor, sd: dict[str, torch.Tensor], key: str, value: torch.Tensor | None = None) -> None:
    if key not in sd:
        raise ValueError(f"state dict has no '{key}'")
    v = sd[key] if value is None else value
    if tuple(v.shape) != tuple(dst.shape):
        raise ValueError(f"state dict '{key}' has shape {tuple(v.shape)}, the net needs {tuple(dst.shape)}")
    dst.copy_(v)


def _load_pair(net: CaffeNet, sd, conv: str, suffix: str, tv: str, factor: torch.Tensor | None) -> None:
    tv_conv, tv_bn = tv.split("|")
    c, bn, sc = net.layers[conv], net.layers[f"bn{suffix}"], net.layers[f"scale{suffix}"]
    w = sd.get(f"{tv_conv}.weight")
    if factor is not None and w is not None:  # RGB -> BGR, divided by the per-channel factor
        w = (w.double() / factor.reshape(1, 3, 1, 1)).flip(1).float()
    _copy(c.weight, sd, f"{tv_conv}.weight", w)
    if c.bias is not None:
        c.bias.zero_()
    _copy(bn.mean, sd, f"{tv_bn}.running_mean")
    var = sd.get(f"{tv_bn}.running_var")
    _copy(bn.variance, sd, f"{tv_bn}.running_var", None if var is None else var.double() + TV_EPS - bn.eps)
    bn.scale_factor.fill_(1.0)
    _copy(sc.weight, sd, f"{tv_bn}.weight")
    _copy(sc.bias, sd, f"{tv_bn}.bias")


def export_torchvision(
    net: CaffeNet, out, mean: torch.Tensor | None = None, scale: float = 1.0, rtol: float = 1e-4
) -> dict[str, float]:
    """Write ``net``'s torchvision state dict to ``out`` (torch.save), checked by loading it with strict=True into
    torchvision's model and comparing logits on a random batch; nothing is written on a mismatch. With ``mean``
    (which must be torchvision's, as mean_value) the model takes torchvision's normalized RGB input."""
    import torchvision

    from resnet_imagenet.util.atomic import atomic_path

    arch = detect_arch(net)
    factor = None
    if mean is not None:
        want = torch.tensor(mean_bgr_255())
        if mean.numel() != 3 or (mean.double().flatten() - want.double()).abs().max() > 0.01:
            raise ValueError(
                f"--format torchvision folds only torchvision's own mean (BGR {', '.join(f'{v:g}' for v in want)}):"
                " another mean has no exact place in its bias-free conv1 (zero padding)"
            )
        factor = torch.tensor([255.0 * s * scale for s in STD_RGB])
    elif scale != 1.0:
        raise ValueError("--scale needs --mean-value for --format torchvision")
    sd = to_torchvision(net.cpu().eval(), factor)
    fc = _fc(net)
    model = getattr(torchvision.models, arch)(num_classes=sd["fc.weight"].shape[0]).eval()
    with atomic_path(out) as tmp:
        torch.save(sd, tmp)
        try:
            model.load_state_dict(torch.load(tmp, weights_only=True), strict=True)
        except RuntimeError as e:
            raise ValueError(f"{out}: torchvision's {arch} does not take the state dict: {e}") from None
        x = torch.randn(2, *net.input_shapes[net.input_names[0]][1:], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = net(x, blobs=[fc])[fc]
            got = model(x if factor is None else _tv_input(x, scale))
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
        if not err <= rtol:
            raise ValueError(
                f"{out}: torchvision's {arch} computes other outputs than net '{net.name}' (max relative error "
                f"{err:.3g}); torchvision strides the 3x3 of each first bottleneck and pads pool1 -- export the "
                "zoo's _v15 nets, not Kaiming's layout; nothing written"
            )
    return {"logits": err}


def _tv_input(x_ours: torch.Tensor, scale: float) -> torch.Tensor:
    """torchvision's normalized RGB input of the same image as our input ``x_ours`` (mean_bgr_255, ``scale``)."""
    factor = torch.tensor([255.0 * s * scale for s in STD_RGB]).reshape(1, 3, 1, 1)
    return x_ours.flip(1) / factor


def import_folder(arch: str, weights, out, rtol: float = 1e-4) -> float:
    """``from_torchvision`` of the state dict file ``weights``, written into folder ``out`` (all or nothing) after
    checking that the net's logits equal torchvision's on the same random image; returns the relative error."""
    import torchvision

    from resnet_imagenet.proto.text import to_text
    from resnet_imagenet.util.atomic import atomic_path

    sd = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{weights}: not a state dict")
    train_val, deploy, net = from_torchvision(arch, sd)
    model = getattr(torchvision.models, arch)(num_classes=net.layers[_fc(net)].num_output).eval()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: not a torchvision {arch} state dict: {e}") from None
    pixels = torch.randint(0, 256, (2, 3, *net.input_shapes["data"][2:]), generator=torch.Generator().manual_seed(0))
    x = pixels.float() - torch.tensor(mean_bgr_255()).reshape(1, 3, 1, 1)
    fc = _fc(net)
    with torch.no_grad():
        want, got = model(_tv_input(x, 1.0)), net(x, blobs=[fc])[fc]
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    if not err <= rtol:
        raise ValueError(f"{weights}: the imported net differs from torchvision's {arch} (relative error {err:.3g})")
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "deploy.prototxt").write_text(to_text(deploy))
        (tmp / "train_val.prototxt").write_text(to_text(train_val))
        net.save_caffemodel(tmp / f"{arch}.caffemodel")
    return err
