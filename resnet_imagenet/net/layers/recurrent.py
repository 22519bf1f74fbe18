"""Recurrent layers (BVLC Caffe's recurrent_layer, rnn_layer, lstm_layer, lstm_unit_layer).

Caffe unrolls RNN and LSTM into a sub-net over the T timesteps; here the same recurrences run directly, with
Caffe's blobs in Caffe's order and layout, so a .caffemodel's weights map one to one:
  LSTM: W_xc (4H x D), b_c (4H), [W_xc_static (4H x D_static)], W_hc (4H x H); gates in the order i, f, o, g
  RNN:  W_xh (H x D), b_h (H), [W_xh_static (H x D_static)], W_hh (H x H), W_ho (H x H), b_o (H)
Bottoms: x (T x N x ...), cont (T x N; 0 starts a sequence), optional x_static (N x ...), then with
expose_hidden the initial state (h_0, and c_0 for LSTM; 1 x N x H each). Tops: h (or o) (T x N x H), then with
expose_hidden the final state. Without expose_hidden, a forward starts from the previous forward's final state
(caffe: RecurrentLayer::Forward_cpu copies timestep T to timestep 0), zeros at first.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from resnet_imagenet.net.layers.base import CaffeLayer, fill_, filler_of, register

log = logging.getLogger(__name__)


def lstm_unit(c_prev: torch.Tensor, x: torch.Tensor, cont: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """caffe: lstm_unit_layer.cpp -- i, f, o, g = x's four H-wide parts; f is scaled by cont;
    c = f c_prev + i g, h = o tanh(c)."""
    i, f, o, g = x.chunk(4, dim=-1)
    c = cont.unsqueeze(-1) * torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return c, torch.sigmoid(o) * torch.tanh(c)


@register("LSTMUnit")
class LSTMUnit(CaffeLayer):
    """One LSTM step: bottoms c_prev (1 x N x H), x (1 x N x 4H), cont (1 x N); tops c, h. cont gets no
    gradient (caffe: "Cannot backpropagate to sequence indicators")."""

    n_bottoms = (3, 3)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        c, x, cont = bottom_shapes
        if x[:-1] != c[:-1] or x[-1] != 4 * c[-1] or tuple(cont) != tuple(c[:-1]):
            raise ValueError(f"needs c_prev (.. x H), x (.. x 4H), cont (..) alike; got {c}, {x}, {cont}")

    def top_shapes(self):
        return [self.bottom_shapes[0], self.bottom_shapes[0]]

    def forward(self, c_prev, x, cont):
        return lstm_unit(c_prev, x, cont.detach().to(x.dtype))


class _Recurrent(CaffeLayer):
    """What RNN and LSTM share: bottoms, blobs and the carried state (caffe: recurrent_layer.cpp)."""

    n_bottoms = (2, 5)
    gates = 1  # rows of the input transform per hidden unit
    states = ("h",)

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.recurrent_param
        self.hidden, self.expose, self.debug = p.num_output, p.expose_hidden, p.debug_info
        if self.hidden <= 0:
            raise ValueError("recurrent_param.num_output must be positive")
        x, cont = bottom_shapes[:2]
        if len(x) < 3 or tuple(cont) != tuple(x[:2]):
            raise ValueError(f"x must be T x N x ... and cont T x N; got x {x}, cont {cont}")
        n_state = len(self.states) if self.expose else 0
        extra = len(bottom_shapes) - 2 - n_state
        if extra not in (0, 1):
            raise ValueError(f"takes x, cont, optional x_static{', then ' + ', '.join(self.states) if n_state else ''}")
        self.static = extra == 1
        t, n = x[:2]
        for s, shape in zip(self.states, bottom_shapes[2 + extra :]):
            if tuple(shape) != (1, n, self.hidden):
                raise ValueError(f"the {s}_0 bottom must be 1 x {n} x {self.hidden}, is {shape}")
        g = self.gates * self.hidden
        wf, bf = filler_of(p, "weight_filler"), filler_of(p, "bias_filler")
        self._param("W_x", (g, math.prod(x[2:])), wf)
        self._param("b", (g,), bf)
        self.W_static = None
        if self.static:
            self._param("W_static", (g, math.prod(bottom_shapes[2][1:])), wf)
        self._param("W_h", (g, self.hidden), wf)
        self._carried: tuple[torch.Tensor, ...] | None = None

    def _param(self, name, shape, filler) -> None:
        t = nn.Parameter(torch.empty(shape))
        fill_(t, filler)  # caffe: FillerParameter's default is constant 0
        setattr(self, name, t)

    def top_shapes(self):
        t, n = self.bottom_shapes[0][:2]
        state = [(1, n, self.hidden)] * len(self.states) if self.expose else []
        return [(t, n, self.hidden), *state]

    def _initial(self, given, n, like) -> tuple[torch.Tensor, ...]:
        if self.expose:
            return tuple(s.reshape(n, self.hidden) for s in given)
        old = self._carried
        if old is None or old[0].shape != (n, self.hidden) or old[0].dtype != like.dtype:
            return tuple(like.new_zeros(n, self.hidden) for _ in self.states)
        return tuple(s.to(like.device) for s in old)

    def forward(self, x, cont, *rest):
        t, n = x.shape[:2]
        static, given = (rest[0], rest[1:]) if self.static else (None, rest)
        # caffe: x_transform -- W_x x + b for every timestep at once (InnerProduct, axis 2)
        xw = x.reshape(t, n, -1) @ self.W_x.t() + self.b
        if static is not None:
            xw = xw + (static.reshape(n, -1) @ self.W_static.t()).unsqueeze(0)
        cont = cont.detach().to(x.dtype)
        state = self._initial(given, n, xw)
        outs = []
        for k in range(t):
            state, out = self.step(xw[k], cont[k], state)
            outs.append(out)
        if not self.expose:
            self._carried = tuple(s.detach() for s in state)
        top = torch.stack(outs)
        if self.debug:
            log.info("%s: |%s| mean %.6g over %d timesteps", self.name, self.states[0], top.abs().mean().item(), t)
        if self.expose:
            return (top, *(s.unsqueeze(0) for s in state))
        return top


@register("LSTM")
class LSTM(_Recurrent):
    """caffe: lstm_layer.cpp -- gate_input_t = W_hc (cont_t h_{t-1}) + W_xc x_t + b_c [+ W_xc_static x_static],
    then LSTMUnit(c_{t-1}, gate_input_t, cont_t)."""

    blob_names = ("W_x", "b", "W_static", "W_h")  # W_xc, b_c, W_xc_static, W_hc
    gates = 4
    states = ("h", "c")

    def step(self, xw, cont, state):
        h, c = state
        gate_input = (cont.unsqueeze(-1) * h) @ self.W_h.t() + xw
        c, h = lstm_unit(c, gate_input, cont)
        return (h, c), h


@register("RNN")
class RNN(_Recurrent):
    """caffe: rnn_layer.cpp -- h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static]),
    o_t = tanh(W_ho h_t + b_o)."""

    blob_names = ("W_x", "b", "W_static", "W_h", "W_o", "b_o")  # W_xh, b_h, W_xh_static, W_hh, W_ho, b_o

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        p = param.recurrent_param
        self._param("W_o", (self.hidden, self.hidden), filler_of(p, "weight_filler"))
        self._param("b_o", (self.hidden,), filler_of(p, "bias_filler"))

    def step(self, xw, cont, state):
        (h,) = state
        h = torch.tanh((cont.unsqueeze(-1) * h) @ self.W_h.t() + xw)
        return (h,), torch.tanh(h @ self.W_o.t() + self.b_o)
