"""RNN, LSTM and LSTMUnit against Caffe's unrolled nets written as numpy loops (recurrent_layer.cpp, rnn_layer.cpp,
lstm_layer.cpp, lstm_unit_layer.cpp), and their gradients against finite differences.
VALUE_CASES / GRAD_CASES follow the shared layer-test convention (tests/test_layer_registry.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from resnet_imagenet.net import layers as L
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import PrototxtError, parse_text

T, N, D, H, DS = 3, 2, 4, 3, 2
FILL = 'weight_filler { type: "gaussian" std: 0.6 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'
CONT = np.array([[0, 0], [1, 1], [1, 0.0]])  # the second sequence restarts at t = 2


def sig(z):
    return 1 / (1 + np.exp(-z))


def lstm_unit_ref(c_prev, x, cont):
    """caffe: LSTMUnitLayer::Forward_cpu, loop for loop."""
    n, hd = c_prev.shape
    c, h = np.zeros_like(c_prev), np.zeros_like(c_prev)
    for i in range(n):
        for d in range(hd):
            ig = sig(x[i, d])
            fg = 0.0 if cont[i] == 0 else cont[i] * sig(x[i, hd + d])
            og = sig(x[i, 2 * hd + d])
            gg = np.tanh(x[i, 3 * hd + d])
            c[i, d] = fg * c_prev[i, d] + ig * gg
            h[i, d] = og * np.tanh(c[i, d])
    return c, h


def _blobs(m):
    return [b.detach().double().numpy() for b in m.blobs()]


def lstm_ref(m, x, cont, xs=None, h0=None, c0=None):
    """caffe: LSTMLayer's unrolled net -- W_xc_x = W_xc x + b_c; per t: h_conted = cont_t h_{t-1};
    gate_input = W_hc h_conted + W_xc_x_t (+ W_xc_static x_static); LSTMUnit."""
    b = _blobs(m)
    wxc, bc, whc = b[0], b[1], b[-1]
    h = np.zeros((N, H)) if h0 is None else h0.reshape(N, H)
    c = np.zeros((N, H)) if c0 is None else c0.reshape(N, H)
    out = []
    for t in range(x.shape[0]):
        gate = (cont[t][:, None] * h) @ whc.T + x[t].reshape(N, -1) @ wxc.T + bc
        if xs is not None:
            gate = gate + xs.reshape(N, -1) @ b[2].T
        c, h = lstm_unit_ref(c, gate, cont[t])
        out.append(h)
    return np.stack(out), h[None], c[None]


def rnn_ref(m, x, cont, xs=None, h0=None):
    """caffe: RNNLayer's unrolled net -- h_t = tanh(W_hh cont_t h_{t-1} + W_xh x_t + b_h (+ W_xh_static x_static)),
    o_t = tanh(W_ho h_t + b_o)."""
    b = _blobs(m)
    wxh, bh, who, bo, whh = b[0], b[1], b[-2], b[-1], b[-3]
    h = np.zeros((N, H)) if h0 is None else h0.reshape(N, H)
    out = []
    for t in range(x.shape[0]):
        z = (cont[t][:, None] * h) @ whh.T + x[t].reshape(N, -1) @ wxh.T + bh
        if xs is not None:
            z = z + xs.reshape(N, -1) @ b[2].T
        h = np.tanh(z)
        out.append(np.tanh(h @ who.T + bo))
    return np.stack(out), h[None]


def _lstm(extra=""):
    return f'name: "r" type: "LSTM" recurrent_param {{ num_output: {H} {FILL} {extra} }}'


def _rnn(extra=""):
    return f'name: "r" type: "RNN" recurrent_param {{ num_output: {H} {FILL} {extra} }}'


def seq(r):
    return [r.normal(size=(T, N, D)), CONT.copy()]


def seq_static_state(r, n_state):
    return [r.normal(size=(T, N, 2, 2)), CONT.copy(), r.normal(size=(N, DS))] + [
        r.normal(size=(1, N, H)) for _ in range(n_state)
    ]


VALUE_CASES: dict[str, list] = {
    "LSTM": [
        (_lstm(), seq, lambda m, x, c: [lstm_ref(m, x, c)[0]]),
        (  # x_static, exposed h_0 / c_0 and final state; x with trailing axes (flattened from axis 2)
            _lstm("expose_hidden: true"),
            lambda r: seq_static_state(r, 2),
            lambda m, x, c, xs, h0, c0: list(lstm_ref(m, x, c, xs, h0, c0)),
        ),
    ],
    "RNN": [
        (_rnn(), seq, lambda m, x, c: [rnn_ref(m, x, c)[0]]),
        (
            _rnn("expose_hidden: true"),
            lambda r: seq_static_state(r, 1),
            lambda m, x, c, xs, h0: list(rnn_ref(m, x, c, xs, h0)),
        ),
    ],
    "LSTMUnit": [
        (
            'name: "u" type: "LSTMUnit"',
            lambda r: [r.normal(size=(1, N, H)), r.normal(size=(1, N, 4 * H)), np.array([[0, 0.5]])],
            lambda m, c, x, cont: [a[None] for a in lstm_unit_ref(c[0], x[0], cont[0])],
        ),
    ],
}

GRAD_CASES: dict[str, list] = {
    "LSTM": [(_lstm(), seq, (0,)), (_lstm("expose_hidden: true"), lambda r: seq_static_state(r, 2), (0, 2, 3, 4))],
    "RNN": [(_rnn(), seq, (0,)), (_rnn("expose_hidden: true"), lambda r: seq_static_state(r, 1), (0, 2, 3))],
    "LSTMUnit": [VALUE_CASES["LSTMUnit"][0][:2] + ((0, 1),)],  # cont: no gradient
}


def build(text, bottoms) -> L.CaffeLayer:
    torch.manual_seed(0)
    return L.build_layer(parse_text(text, caffe_pb2.LayerParameter()), [b.shape for b in bottoms]).double()


def _flat(cases):
    return [pytest.param(k, c, id=f"{k}-{i}") for k, cs in cases.items() for i, c in enumerate(cs)]


@pytest.mark.parametrize("kind,case", _flat(VALUE_CASES))
def test_forward_matches_caffe(kind, case):
    text, make, expect = case
    bottoms = make(np.random.default_rng(2))
    m = build(text, bottoms)
    assert type(m).__name__ == kind
    out = m(*[torch.from_numpy(b) for b in bottoms])
    outs = out if isinstance(out, tuple) else (out,)
    want = expect(m, *bottoms)
    assert [tuple(o.shape) for o in outs] == [tuple(s) for s in m.top_shapes()] == [w.shape for w in want]
    for o, w in zip(outs, want):
        np.testing.assert_allclose(o.detach().numpy(), w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind,case", _flat(GRAD_CASES))
def test_backward_matches_finite_differences(kind, case):
    text, make, wrt = case
    bottoms = [torch.from_numpy(b) for b in make(np.random.default_rng(4))]
    m = build(text, [b.numpy() for b in bottoms])
    names = [n for n, _ in m.named_parameters()]

    def f(*args):
        full = list(bottoms)
        for i, a in zip(wrt, args):
            full[i] = a
        if hasattr(m, "_carried"):
            m._carried = None  # every call starts from zeros
        out = functional_call(m, dict(zip(names, args[len(wrt) :])), tuple(full))
        return out if isinstance(out, tuple) else (out,)

    inputs = [bottoms[i].clone().requires_grad_() for i in wrt]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (*inputs, *params), atol=1e-7, rtol=1e-5)
    cont = bottoms[1 if kind != "LSTMUnit" else 2].clone().requires_grad_()
    full = [b.clone().requires_grad_() if i in wrt else b for i, b in enumerate(bottoms)]
    full[1 if kind != "LSTMUnit" else 2] = cont
    out = m(*full)
    sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    assert cont.grad is None  # caffe: no backward into the sequence indicators


def test_blob_order_and_shapes_are_caffes():
    r = np.random.default_rng(0)
    lstm = build(_lstm(), seq(r))
    assert [tuple(b.shape) for b in lstm.blobs()] == [(4 * H, D), (4 * H,), (4 * H, H)]  # W_xc, b_c, W_hc
    st = build(_lstm("expose_hidden: true"), seq_static_state(r, 2))
    assert [tuple(b.shape) for b in st.blobs()] == [(4 * H, 4), (4 * H,), (4 * H, DS), (4 * H, H)]
    rnn = build(_rnn(), seq(r))  # W_xh, b_h, W_hh, W_ho, b_o
    assert [tuple(b.shape) for b in rnn.blobs()] == [(H, D), (H,), (H, H), (H, H), (H,)]
    plain = L.build_layer(parse_text(f'name: "r" type: "RNN" recurrent_param {{ num_output: {H} }}',
                                     caffe_pb2.LayerParameter()), [(T, N, D), (T, N)])  # fmt: skip
    assert all(torch.count_nonzero(b) == 0 for b in plain.blobs())  # caffe's default filler: constant 0


@pytest.mark.parametrize("text", [_lstm(), _rnn()])
def test_state_carries_over_between_forwards_without_expose_hidden(text):
    # caffe: RecurrentLayer::Forward_cpu copies the last timestep's state into timestep 0 of the next forward
    r = np.random.default_rng(7)
    x = r.normal(size=(2 * T, N, D))
    cont = np.ones((2 * T, N))
    cont[0] = 0
    whole = build(text, [x, cont])
    halves = build(text, [x[:T], cont[:T]])
    full = whole(torch.from_numpy(x), torch.from_numpy(cont))
    first = halves(torch.from_numpy(x[:T]), torch.from_numpy(cont[:T]))
    second = halves(torch.from_numpy(x[T:]), torch.from_numpy(cont[T:]))
    torch.testing.assert_close(torch.cat([first, second]), full, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "text,shapes,match",
    [
        ('type: "LSTM" recurrent_param { num_output: 0 }', [(T, N, D), (T, N)], "num_output must be positive"),
        ('type: "LSTM" recurrent_param { num_output: 3 }', [(T, N, D), (T, 1)], "cont T x N"),
        ('type: "RNN" recurrent_param { num_output: 3 expose_hidden: true }', [(T, N, D), (T, N), (1, N, 2)], "h_0"),
        ('type: "LSTMUnit"', [(1, N, H), (1, N, 3 * H), (1, N)], "4H"),
    ],
)
def test_bad_bottoms_are_refused_naming_the_layer(text, shapes, match):
    with pytest.raises(PrototxtError, match=f"layer 'bad'.*{match}"):
        L.build_layer(parse_text('name: "bad" ' + text, caffe_pb2.LayerParameter()), shapes)
