"""Loss layers (and Accuracy) against Caffe's formulas written as numpy loops, and their gradients against finite
differences. VALUE_CASES / GRAD_CASES follow the shared layer-test convention (tests/test_layer_registry.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from resnet_imagenet.net import layers as L
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import array_to_blob
from resnet_imagenet.proto.text import PrototxtError, parse_text

FLT_MIN = float(np.finfo(np.float32).tiny)
LOG_THRESHOLD = float(np.float32(1e-20))  # caffe: loss_layer.hpp kLOG_THRESHOLD
H_MATRIX = np.array([[1.0, 0.5, 0.0], [0.25, 2.0, 0.0], [0.0, 1.0, 1.5]])  # infogain_loss_param.source's blob

Make = Callable[[np.random.Generator], list[np.ndarray]]


def _labels(n: int, c: int, *shape: int) -> Make:
    return lambda r: [r.normal(size=(n, c, *shape)), r.integers(0, c, size=(n, *shape)).astype(np.float64)]


# --- Caffe's forward passes as loops ------------------------------------------------------------------------


def softmax_np(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _norm(mode: str, outer: int, inner: int, count: int, has_ignore: bool) -> float:
    # caffe: softmax_loss_layer.cpp get_normalizer
    n = {"FULL": outer * inner, "VALID": count if has_ignore else outer * inner, "BATCH_SIZE": outer, "NONE": 1}
    return max(1.0, n[mode])


def softmax_loss_ref(x, label, axis=1, ignore=None, mode="VALID", clamp=FLT_MIN, h=None):
    """caffe: softmax_loss_layer.cpp Forward_cpu (and infogain_loss_layer.cpp's with ``h`` and kLOG_THRESHOLD)."""
    c = x.shape[axis]
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1 :])
    p = softmax_np(x, axis).reshape(outer, c, inner)
    lab = label.reshape(outer, inner).astype(int)
    loss, count = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            k = lab[i, j]
            if ignore is not None and k == ignore:
                continue
            if h is None:
                loss -= math.log(max(p[i, k, j], clamp))
            else:
                loss -= sum(h[k, m] * math.log(max(p[i, m, j], clamp)) for m in range(c))
            count += 1
    return loss / _norm(mode, outer, inner, count, ignore is not None)


def accuracy_ref(x, label, top_k=1, axis=1, ignore=None):
    """caffe: accuracy_layer.cpp Forward_cpu -- returns (accuracy, per-class accuracy)."""
    c = x.shape[axis]
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1 :])
    s, lab = x.reshape(outer, c, inner), label.reshape(outer, inner).astype(int)
    right, count, per, seen = 0, 0, np.zeros(c), np.zeros(c)
    for i in range(outer):
        for j in range(inner):
            k = lab[i, j]
            if ignore is not None and k == ignore:
                continue
            seen[k] += 1
            better = -1
            for m in range(c):
                better += s[i, m, j] >= s[i, k, j]
            if better < top_k:
                right += 1
                per[k] += 1
            count += 1
    return [right / count if count else 0.0, np.where(seen > 0, per / np.maximum(seen, 1), 0.0)]


def sigmoid_ce_ref(x, t, ignore=None, mode="BATCH_SIZE"):
    """caffe: sigmoid_cross_entropy_loss_layer.cpp Forward_cpu."""
    loss, count = 0.0, 0
    for xi, ti in zip(x.ravel(), t.ravel()):
        if ignore is not None and int(ti) == ignore:
            continue
        pos = float(xi >= 0)
        loss -= xi * (ti - pos) - math.log(1 + math.exp(xi - 2 * xi * pos))
        count += 1
    return loss / _norm(mode, x.shape[0], x.size // x.shape[0], count, ignore is not None)


def euclidean_ref(a, b):
    """caffe: euclidean_loss_layer.cpp -- dot(a - b, a - b) / num / 2."""
    d = (a - b.reshape(a.shape)).ravel()
    return float(d @ d) / a.shape[0] / 2


def contrastive_ref(a, b, y, margin=1.0, legacy=False):
    """caffe: contrastive_loss_layer.cpp Forward_cpu."""
    loss = 0.0
    for i in range(a.shape[0]):
        d2 = float(((a[i] - b[i]) ** 2).sum())
        if int(y.ravel()[i]):
            loss += d2
        elif legacy:
            loss += max(margin - d2, 0.0)
        else:
            loss += max(margin - math.sqrt(d2), 0.0) ** 2
    return loss / a.shape[0] / 2


def contrastive_grad_ref(a, b, y, margin=1.0, legacy=False):
    """caffe: contrastive_loss_layer.cpp Backward_cpu -- d loss / d a (d / d b is its negative)."""
    g = np.zeros_like(a)
    n = a.shape[0]
    for j in range(n):
        diff = a[j] - b[j]
        if int(y.ravel()[j]):
            g[j] = diff / n
            continue
        d2 = float((diff**2).sum())
        if legacy:
            mdist, beta = margin - d2, -1.0 / n
        else:
            dist = math.sqrt(d2)
            mdist = margin - dist
            beta = -(1.0 / n) * mdist / (dist + 1e-4)
        g[j] = beta * diff if mdist > 0 else 0.0
    return g


def hinge_ref(x, label, l2=False):
    """caffe: hinge_loss_layer.cpp Forward_cpu."""
    n = x.shape[0]
    d = x.reshape(n, -1).copy()
    for i in range(n):
        d[i, int(label[i])] *= -1
    d = np.maximum(0.0, 1 + d)
    return float((d * d).sum() if l2 else np.abs(d).sum()) / n


def mll_ref(p, label):
    """caffe: multinomial_logistic_loss_layer.cpp Forward_cpu."""
    n = p.shape[0]
    q = p.reshape(n, -1)
    return sum(-math.log(max(q[i, int(label.ravel()[i])], LOG_THRESHOLD)) for i in range(n)) / n


def _probs(n: int, c: int) -> Make:
    def make(r):
        p = softmax_np(r.normal(size=(n, c)), 1)
        return [p, r.integers(0, c, size=(n, 1, 1, 1)).astype(np.float64)]

    return make


def _pairs(n, c, scale=0.4) -> Make:
    return lambda r: [r.normal(size=(n, c)) * scale, r.normal(size=(n, c)) * scale, np.array([1, 0, 0, 1, 0.0])[:n]]


# --- the cases ------------------------------------------------------------------------------------------------

SWL = 'name: "l" type: "SoftmaxWithLoss" top: "loss" '
_ign = lambda r: [r.normal(size=(5, 3)), np.array([0, 1, 2, 1, 1.0])]  # noqa: E731

VALUE_CASES: dict[str, list] = {
    "SoftmaxWithLoss": [
        (SWL, _labels(4, 3), lambda x, y: [softmax_loss_ref(x, y)]),
        (SWL + "loss_param { ignore_label: 1 }", _ign, lambda x, y: [softmax_loss_ref(x, y, ignore=1)]),
        (
            SWL + "loss_param { ignore_label: 1 normalization: FULL }",
            _ign,
            lambda x, y: [softmax_loss_ref(x, y, ignore=1, mode="FULL")],
        ),
        (SWL + "loss_param { normalization: NONE }", _labels(4, 3), lambda x, y: [softmax_loss_ref(x, y, mode="NONE")]),
        (
            SWL + "loss_param { ignore_label: 1 normalize: false }",  # deprecated: normalize false = BATCH_SIZE
            _ign,
            lambda x, y: [softmax_loss_ref(x, y, ignore=1, mode="BATCH_SIZE")],
        ),
        (  # spatial labels (FCN): BATCH_SIZE divides by N only
            SWL + "loss_param { normalization: BATCH_SIZE }",
            _labels(2, 3, 2, 2),
            lambda x, y: [softmax_loss_ref(x, y, mode="BATCH_SIZE")],
        ),
        (
            SWL + 'top: "prob" softmax_param { axis: 2 }',  # class axis 2; second top = the softmax
            lambda r: [r.normal(size=(2, 3, 4)), r.integers(0, 4, size=(2, 3)).astype(np.float64)],
            lambda x, y: [softmax_loss_ref(x, y, axis=2), softmax_np(x, 2)],
        ),
    ],
    "Accuracy": [
        (
            'name: "a" type: "Accuracy" top: "acc" top: "per_class"',
            lambda r: [np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]]), np.array([0, 2, 0.0])],
            lambda x, y: accuracy_ref(x, y),  # the tie counts against the first sample
        ),
        (
            'name: "a" type: "Accuracy" accuracy_param { top_k: 2 }',
            _labels(6, 4),
            lambda x, y: accuracy_ref(x, y, 2)[:1],
        ),
        (
            'name: "a" type: "Accuracy" top: "a" top: "b" accuracy_param { ignore_label: 1 axis: -1 }',
            lambda r: [r.normal(size=(3, 2, 4)), r.integers(0, 4, size=(3, 2)).astype(np.float64)],
            lambda x, y: accuracy_ref(x, y, axis=2, ignore=1),
        ),
    ],
    "SigmoidCrossEntropyLoss": [
        (
            'name: "l" type: "SigmoidCrossEntropyLoss"',  # default: BATCH_SIZE; targets need not be 0/1
            lambda r: [r.normal(size=(3, 4)) * 4, r.uniform(size=(3, 4))],
            lambda x, t: [sigmoid_ce_ref(x, t)],
        ),
        (
            'name: "l" type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 normalization: VALID }',
            lambda r: [r.normal(size=(2, 3, 2)), np.array([[[1, 0], [-1, 1], [0, -1]], [[1, 1], [0, 0], [-1, 0.0]]])],
            lambda x, t: [sigmoid_ce_ref(x, t, ignore=-1, mode="VALID")],
        ),
        (
            'name: "l" type: "SigmoidCrossEntropyLoss" loss_param { normalization: FULL }',
            lambda r: [r.normal(size=(2, 5)) * 30, r.integers(0, 2, size=(2, 5)).astype(np.float64)],  # saturated
            lambda x, t: [sigmoid_ce_ref(x, t, mode="FULL")],
        ),
    ],
    "EuclideanLoss": [
        (
            'name: "l" type: "EuclideanLoss"',
            lambda r: [r.normal(size=(4, 3)), r.normal(size=(4, 3))],
            lambda a, b: [euclidean_ref(a, b)],
        ),
        (
            'name: "l" type: "EuclideanLoss"',  # caffe checks count(1) only: (N, 2, 2) against (N, 4)
            lambda r: [r.normal(size=(2, 2, 2)), r.normal(size=(2, 4))],
            lambda a, b: [euclidean_ref(a, b)],
        ),
    ],
    "ContrastiveLoss": [
        ('name: "l" type: "ContrastiveLoss"', _pairs(5, 3), lambda a, b, y: [contrastive_ref(a, b, y)]),
        (
            'name: "l" type: "ContrastiveLoss" contrastive_loss_param { margin: 2 legacy_version: true }',
            _pairs(5, 3, 0.6),
            lambda a, b, y: [contrastive_ref(a, b, y, 2.0, legacy=True)],
        ),
    ],
    "HingeLoss": [
        ('name: "l" type: "HingeLoss"', _labels(4, 5), lambda x, y: [hinge_ref(x, y)]),
        (
            'name: "l" type: "HingeLoss" hinge_loss_param { norm: L2 }',
            _labels(4, 5),
            lambda x, y: [hinge_ref(x, y, True)],
        ),
    ],
    "InfogainLoss": [
        (
            'name: "l" type: "InfogainLoss" infogain_loss_param { source: "$DIR/H.binaryproto" }',
            _labels(4, 3),
            lambda x, y: [softmax_loss_ref(x, y, clamp=LOG_THRESHOLD, h=H_MATRIX)],
        ),
        (  # H as a third bottom; class axis 2; ignore_label; second top = the softmax
            'name: "l" type: "InfogainLoss" top: "l" top: "p" infogain_loss_param { axis: 2 } '
            "loss_param { ignore_label: 0 }",
            lambda r: [r.normal(size=(2, 2, 3)) * 30, np.array([[0, 2], [1, 2.0]]), H_MATRIX.copy()],
            lambda x, y, h: [softmax_loss_ref(x, y, 2, 0, clamp=LOG_THRESHOLD, h=h), softmax_np(x, 2)],
        ),
    ],
    "MultinomialLogisticLoss": [
        ('name: "l" type: "MultinomialLogisticLoss"', _probs(4, 3), lambda p, y: [mll_ref(p, y)]),
        (
            'name: "l" type: "MultinomialLogisticLoss"',  # a zero probability: -log(kLOG_THRESHOLD) = 46.05
            lambda r: [np.array([[0.0, 1.0], [0.5, 0.5]]), np.array([0, 1.0])],
            lambda p, y: [mll_ref(p, y)],
        ),
    ],
}

# (layer text, bottoms, indices of the bottoms Caffe propagates to, gradcheck (atol, rtol))
TIGHT = (1e-6, 1e-4)
GRAD_CASES: dict[str, list] = {
    "SoftmaxWithLoss": [
        (SWL + "loss_param { ignore_label: 1 }", _ign, (0,), TIGHT),
        (
            SWL + "softmax_param { axis: 2 }",
            lambda r: [r.normal(size=(2, 3, 4)), r.integers(0, 4, size=(2, 3)) * 1.0],
            (0,),
            TIGHT,
        ),
    ],
    "Accuracy": [('name: "a" type: "Accuracy" top: "a" top: "b"', _labels(4, 3), (), TIGHT)],  # caffe: no backward
    "SigmoidCrossEntropyLoss": [
        (
            'name: "l" type: "SigmoidCrossEntropyLoss"',
            lambda r: [r.normal(size=(3, 4)), r.uniform(size=(3, 4))],
            (0,),
            TIGHT,
        ),
        (VALUE_CASES["SigmoidCrossEntropyLoss"][1][0], VALUE_CASES["SigmoidCrossEntropyLoss"][1][1], (0,), TIGHT),
    ],
    "EuclideanLoss": [('name: "l" type: "EuclideanLoss"', VALUE_CASES["EuclideanLoss"][1][1], (0, 1), TIGHT)],
    "ContrastiveLoss": [
        # caffe divides by d + 1e-4 where the derivative has d: agreement to ~1e-4 relative (exact test below)
        ('name: "l" type: "ContrastiveLoss"', _pairs(5, 3), (0, 1), (1e-5, 2e-3)),
        (VALUE_CASES["ContrastiveLoss"][1][0], _pairs(5, 3, 0.6), (0, 1), TIGHT),  # legacy: exact derivative
    ],
    "HingeLoss": [
        ('name: "l" type: "HingeLoss"', _labels(4, 5), (0,), TIGHT),
        ('name: "l" type: "HingeLoss" hinge_loss_param { norm: L2 }', _labels(4, 5), (0,), TIGHT),
    ],
    "InfogainLoss": [
        (VALUE_CASES["InfogainLoss"][0][0], _labels(4, 3), (0,), TIGHT),
        (
            'name: "l" type: "InfogainLoss" loss_param { ignore_label: 0 }',
            lambda r: [r.normal(size=(4, 3)), np.array([0, 1, 2, 1.0]), H_MATRIX.copy()],
            (0,),
            TIGHT,
        ),
    ],
    "MultinomialLogisticLoss": [('name: "l" type: "MultinomialLogisticLoss"', _probs(4, 3), (0,), TIGHT)],
}


def build(text: str, bottoms: list[np.ndarray], tmp_path) -> L.CaffeLayer:
    blob = array_to_blob(H_MATRIX.astype(np.float32))
    (tmp_path / "H.binaryproto").write_bytes(blob.SerializeToString())
    lp = parse_text(text.replace("$DIR", str(tmp_path)), caffe_pb2.LayerParameter())
    return L.build_layer(lp, [b.shape for b in bottoms])


def _flat(cases: dict) -> list:
    return [pytest.param(k, c, id=f"{k}-{i}") for k, cs in cases.items() for i, c in enumerate(cs)]


@pytest.mark.parametrize("kind,case", _flat(VALUE_CASES))
def test_forward_matches_caffe(kind, case, tmp_path):
    text, make, expect = case
    bottoms = make(np.random.default_rng(3))
    m = build(text, bottoms, tmp_path)
    assert type(m).__name__ == kind
    out = m(*[torch.from_numpy(b) for b in bottoms])
    outs = out if isinstance(out, tuple) else (out,)
    want = expect(*bottoms)
    assert len(outs) == len(want) == len(m.top_shapes())
    for o, w, shape in zip(outs, want, m.top_shapes()):
        assert tuple(o.shape) == tuple(shape)
        np.testing.assert_allclose(o.detach().numpy(), w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,case", _flat(GRAD_CASES))
def test_backward_matches_finite_differences(kind, case, tmp_path):
    text, make, wrt, (atol, rtol) = case
    bottoms = [torch.from_numpy(b) for b in make(np.random.default_rng(5))]
    m = build(text, [b.numpy() for b in bottoms], tmp_path)
    assert type(m).__name__ == kind
    if not wrt:  # caffe: Backward NOT_IMPLEMENTED -- nothing to differentiate
        outs = m(*[b.requires_grad_() for b in bottoms])
        assert not any(o.requires_grad for o in (outs if isinstance(outs, tuple) else (outs,)))
        return

    def loss(*diff):
        full = list(bottoms)
        for i, d in zip(wrt, diff):
            full[i] = d
        out = m(*full)
        return out[0] if isinstance(out, tuple) else out

    diff = [bottoms[i].clone().requires_grad_() for i in wrt]
    assert torch.autograd.gradcheck(loss, diff, atol=atol, rtol=rtol)
    # the other bottoms (labels, H) get no gradient: caffe refuses to propagate to them
    others = [b.clone().requires_grad_() for b in bottoms]
    out = m(*others)
    (out[0] if isinstance(out, tuple) else out).backward()
    assert all((b.grad is None) == (i not in wrt) for i, b in enumerate(others))


def test_contrastive_backward_is_caffes_with_its_epsilon():
    r = np.random.default_rng(1)
    a, b, y = _pairs(5, 3)(r)
    b[1] = a[1]  # a dissimilar pair at distance 0: caffe's gradient is 0 there, not NaN
    for text, margin, legacy in [
        ('name: "l" type: "ContrastiveLoss"', 1.0, False),
        (VALUE_CASES["ContrastiveLoss"][1][0], 2.0, True),
    ]:
        m = L.build_layer(parse_text(text, caffe_pb2.LayerParameter()), [a.shape, b.shape, y.shape])
        ta, tb = torch.from_numpy(a).requires_grad_(), torch.from_numpy(b).requires_grad_()
        m(ta, tb, torch.from_numpy(y)).backward()
        want = contrastive_grad_ref(a, b, y, margin, legacy)
        np.testing.assert_allclose(ta.grad.numpy(), want, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(tb.grad.numpy(), -want, rtol=1e-12, atol=1e-15)


def test_multinomial_logistic_gradient_keeps_the_threshold():
    # caffe: bottom_diff[label] = -loss_weight / num / max(p, kLOG_THRESHOLD), also below the threshold
    m = L.build_layer(
        parse_text('name: "l" type: "MultinomialLogisticLoss"', caffe_pb2.LayerParameter()), [(2, 2), (2,)]
    )
    p = torch.tensor([[0.0, 1.0], [0.25, 0.75]], dtype=torch.float64, requires_grad=True)
    m(p, torch.tensor([0.0, 1.0])).backward()
    np.testing.assert_allclose(p.grad.numpy(), [[-0.5 / LOG_THRESHOLD, 0.0], [0.0, -0.5 / 0.75]], rtol=1e-12)


def test_infogain_gradient_is_caffes_where_the_clamp_bites():
    # caffe: diff = p * sum_l H[label, l] - H[label] even where log(max(p, 1e-20)) is clamped
    x = np.array([[0.0, 60.0, -60.0]])
    m = L.build_layer(parse_text('name: "l" type: "InfogainLoss"', caffe_pb2.LayerParameter()), [(1, 3), (1,), (3, 3)])
    tx = torch.from_numpy(x).requires_grad_()
    loss = m(tx, torch.tensor([2.0]), torch.from_numpy(H_MATRIX))
    assert loss.item() == pytest.approx(softmax_loss_ref(x, np.array([2.0]), clamp=LOG_THRESHOLD, h=H_MATRIX))
    loss.backward()
    p = softmax_np(x, 1)
    np.testing.assert_allclose(tx.grad.numpy(), p * H_MATRIX[2].sum() - H_MATRIX[2], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "text,shapes,match",
    [
        ('type: "EuclideanLoss"', [(2, 3), (2, 4)], "same dimension"),
        ('type: "SoftmaxWithLoss"', [(2, 3), (3,)], "same first dimension"),
        ('type: "SoftmaxWithLoss"', [(2, 3, 2), (2,)], "2 labels for 4 predictions"),
        ('type: "SigmoidCrossEntropyLoss"', [(2, 3), (2, 2)], "same count"),
        ('type: "ContrastiveLoss"', [(2, 3, 2, 1), (2, 3, 2, 1), (2,)], "must be N x C"),
        ('type: "Accuracy" accuracy_param { top_k: 4 }', [(2, 3), (2,)], "top_k 4"),
        ('type: "InfogainLoss"', [(2, 3), (2,)], "source"),
        ('type: "InfogainLoss" loss_param { normalize: true }', [(2, 3), (2,), (3, 3)], "deprecated"),
        ('type: "InfogainLoss"', [(2, 3), (2,), (2, 2)], "3x3"),
        ('type: "MultinomialLogisticLoss"', [(2, 3), (2, 3)], "one value per sample"),
    ],
)
def test_bad_bottoms_are_refused_naming_the_layer(text, shapes, match):
    with pytest.raises(PrototxtError, match=f"layer 'bad'.*{match}"):
        L.build_layer(parse_text('name: "bad" ' + text, caffe_pb2.LayerParameter()), shapes)


def test_net_loss_weights_every_loss_type_and_only_the_first_top_by_default():
    from resnet_imagenet.net.net import CaffeNet

    text = (
        'layer { name: "in" type: "Input" top: "x" top: "y" top: "t" '
        "input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } shape { dim: 2 } } } "
        'layer { name: "e" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "e" loss_weight: 0.5 } '
        'layer { name: "s" type: "SoftmaxWithLoss" bottom: "x" bottom: "t" top: "s" top: "prob" } '
        'layer { name: "h" type: "HingeLoss" bottom: "y" bottom: "t" top: "h" }'
    )
    net = CaffeNet(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    assert net.loss_weights == {"e": 0.5, "s": 1.0, "h": 1.0}  # caffe: the prob top weighs 0
    r = np.random.default_rng(0)
    x, y, t = r.normal(size=(2, 3)), r.normal(size=(2, 3)), np.array([0.0, 2.0])
    out = net(*[torch.from_numpy(a) for a in (x, y, t)])
    want = 0.5 * euclidean_ref(x, y) + softmax_loss_ref(x, t) + hinge_ref(y, t)
    assert net.loss(out).item() == pytest.approx(want, rel=1e-6)
    bad = text.replace("loss_weight: 0.5", "loss_weight: 0.5 loss_weight: 1")
    with pytest.raises(PrototxtError, match="layer 'e': loss_weight must be unspecified or given once per top"):
        CaffeNet(parse_text(bad, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
