"""The case format of the layer family tests (tests/test_layers_<family>.py) and the two checks run over it.

A ``Case`` is one layer prototxt, its bottoms (numpy arrays) and, for value cases, the expected tops computed
from Caffe's formulas in numpy; ``setup`` gives the layer's blobs known values first. ``check_value`` runs the
layer in float64 and compares; ``check_grad`` runs torch.autograd.gradcheck over the bottoms named in
``grad`` and every learnable blob (Caffe's GradientChecker), or, for a type Caffe gives no backward,
asserts that no gradient reaches the bottoms (``grad=()`` with ``no_grad=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call

from resnet_imagenet.net import layers as L
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text


@dataclass
class Case:
    text: str  # the layer's prototxt body (name, type, *_param ...)
    bottoms: Sequence[np.ndarray]
    expect: Callable[..., object] | None = None  # numpy bottoms -> top (array) or list of tops
    setup: Callable[[L.CaffeLayer], None] | None = None
    train: bool = False
    grad: Sequence[int] | None = None  # bottoms checked by gradcheck (None: all)
    no_grad: bool = False  # Caffe has no backward here: assert nothing flows
    seed: int | None = None  # random layers: reseed before every forward
    batch_dynamic: bool = False  # top_shapes() gives the whole batch, the run keeps some items (BVLC Filter)
    tops: list = field(default_factory=list)


def build(case: Case) -> L.CaffeLayer:
    lp = parse_text(case.text, caffe_pb2.LayerParameter())
    m = L.build_layer(lp, [tuple(b.shape) for b in case.bottoms]).double()
    m.train(case.train)
    if case.setup is not None:
        with torch.no_grad():
            case.setup(m)
    return m


def _tops(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def check_value(case: Case) -> None:
    m = build(case)
    xs = [torch.from_numpy(np.asarray(b, dtype=np.float64)) for b in case.bottoms]
    if case.seed is not None:
        torch.manual_seed(case.seed)
    got = _tops(m(*xs))
    want = case.expect(*[np.asarray(b, dtype=np.float64) for b in case.bottoms])
    want = list(want) if isinstance(want, (list, tuple)) else [want]
    assert len(got) == len(want), f"{len(got)} tops, expected {len(want)}"
    cut = 1 if case.batch_dynamic else 0
    assert [tuple(t.shape)[cut:] for t in got] == [tuple(s)[cut:] for s in m.top_shapes()], "top_shapes() disagrees"
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.detach().numpy(), np.asarray(w, dtype=np.float64), rtol=1e-10, atol=1e-12)


def check_grad(case: Case) -> None:
    m = build(case)
    xs = [torch.from_numpy(np.asarray(b, dtype=np.float64)).clone() for b in case.bottoms]
    idx = list(range(len(xs))) if case.grad is None else list(case.grad)
    if case.no_grad:
        for i in idx:
            xs[i].requires_grad_(True)
        tops = [t for t in _tops(m(*xs)) if t.requires_grad]
        if tops:
            grads = torch.autograd.grad(sum(t.sum() for t in tops), [xs[i] for i in idx], allow_unused=True)
            assert all(g is None or not g.any() for g in grads), "Caffe propagates no gradient here"
        return
    names = [n for n, p in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    assert idx or params, "a gradient case needs a bottom or a learnable blob to check"

    def fn(*flat):
        full = list(xs)
        for k, i in enumerate(idx):
            full[i] = flat[k]
        if case.seed is not None:
            torch.manual_seed(case.seed)
        out = functional_call(m, dict(zip(names, flat[len(idx) :])), tuple(full))
        return tuple(_tops(out))

    inputs = [xs[i].requires_grad_(True) for i in idx] + params
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
