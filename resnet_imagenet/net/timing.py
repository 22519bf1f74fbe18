"""Caffe's ``caffe time``: average forward and backward time of every layer and of whole iterations.

Forward hooks on each layer time its forward; autograd hooks on its output time its backward. Caffe
times on random data at the net's own batch size; so does this.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import torch

from resnet_imagenet.net.cost import load_at_batch
from resnet_imagenet.net.net import CaffeNet

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _LayerTimer:
    """Forward and backward time of each layer, taken inside a normal forward + autograd backward.

    Forward: module pre/post hooks. Backward: hooks on the autograd nodes each layer created (found
    by walking from its outputs back to its inputs), summed, as Caffe times each Layer::Backward.
    A Scale that CaffeNet folds into the BatchNorm before it shows 0: its time is in the BatchNorm.
    """

    def __init__(self, net: CaffeNet, device: torch.device) -> None:
        self.device = device
        self.forward_s: dict[str, float] = defaultdict(float)
        self.backward_s: dict[str, float] = defaultdict(float)
        self._start: dict[str, tuple[float, list]] = {}
        self._handles = []
        for name, module in net.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(module, args):
            # grad_fn now: an in-place layer (ReLU) rewrites its input's history below
            boundary = [a.grad_fn for a in args if isinstance(a, torch.Tensor)]
            _sync(self.device)
            self._start[name] = (time.perf_counter(), boundary)

        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            _sync(self.device)
            t0, boundary = self._start.pop(name)
            self.forward_s[name] += time.perf_counter() - t0
            if torch.is_grad_enabled():
                outs = output if isinstance(output, tuple) else (output,)
                for node in self._nodes(outs, boundary):
                    self._time_node(node, name)

        return hook

    @staticmethod
    def _nodes(outputs, boundary) -> list:
        stop = {id(n) for n in boundary if n is not None}
        todo = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        seen, nodes = set(), []
        while todo:
            node = todo.pop()
            if node is None or id(node) in stop or id(node) in seen:
                continue
            seen.add(id(node))
            nodes.append(node)
            todo.extend(n for n, _ in node.next_functions)
        return nodes

    def _time_node(self, node, name: str) -> None:
        start = []

        def pre(grad_outputs):
            _sync(self.device)
            start.append(time.perf_counter())

        def post(grad_inputs, grad_outputs):
            _sync(self.device)
            self.backward_s[name] += time.perf_counter() - start.pop()

        node.register_prehook(pre)
        node.register_hook(post)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _objective(net: CaffeNet, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """What backward starts from: the weighted losses, or (a deploy net) the sum of its float outputs."""
    if net.loss_weights:
        return net.loss(out)
    return sum(t.float().sum() for t in out.values() if t.requires_grad)


def time_net(
    model_path: str | os.PathLike,
    iterations: int = 50,
    device: str = "cpu",
    phase: str = "train",
    batch: int | None = None,
    input_shapes: dict | None = None,
) -> dict:
    """Caffe's ``caffe time``: average forward and backward time per layer and per iteration (ms).

    Like Caffe it runs the net in ``phase`` (TRAIN by default) on its own batch size (``batch``
    overrides it) after one untimed forward + backward, on random data and labels 0, on ``device``
    (a torch device string: "cpu", "cuda:0"). ``input_shapes``: data layers' top shapes where known.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, not {iterations}")
    dev = torch.device(device)
    net = load_at_batch(model_path, phase, batch, input_shapes).to(dev)
    inputs = {}
    for name in net.input_names:
        shape = net.input_shapes[name]
        inputs[name] = torch.zeros(shape, device=dev) if len(shape) == 1 else torch.randn(shape, device=dev)
    log.info("Performing Forward")
    loss = _objective(net, net(**inputs))
    log.info("Initial loss: %g", loss.item())
    log.info("Performing Backward")
    if loss.requires_grad:
        loss.backward()
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", iterations)
    timer = _LayerTimer(net, dev)
    try:
        times = _timed_iterations(net, inputs, iterations, dev)
    finally:
        timer.remove()
    log.info("Average time per layer: ")
    layers = []
    for lp in net.layer_params:
        fwd = timer.forward_s[lp.name] * 1e3 / iterations
        bwd = timer.backward_s[lp.name] * 1e3 / iterations
        layers.append((lp.name, fwd, bwd))
        log.info("%10s\tforward: %.5f ms.", lp.name, fwd)
        log.info("%10s\tbackward: %.5f ms.", lp.name, bwd)
    result = {"layers": layers, **times}
    log.info("Average Forward pass: %.3f ms.", result["forward_ms"])
    log.info("Average Backward pass: %.3f ms.", result["backward_ms"])
    log.info("Average Forward-Backward: %.3f ms.", result["forward_backward_ms"])
    log.info("Total Time: %.3f ms.", result["total_ms"])
    log.info("*** Benchmark ends ***")
    return result


def _timed_iterations(
    net: CaffeNet, inputs: dict[str, torch.Tensor], iterations: int, device: torch.device
) -> dict[str, float]:
    """Run and time ``iterations`` forward + backward passes; the averages (ms) and the total."""
    forward_s = backward_s = 0.0
    total0 = time.perf_counter()
    for i in range(iterations):
        net.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        loss = _objective(net, net(**inputs))
        _sync(device)
        t1 = time.perf_counter()
        if loss.requires_grad:
            loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        forward_s += t1 - t0
        backward_s += t2 - t1
        log.info("Iteration: %d forward-backward time: %.3f ms.", i + 1, (t2 - t0) * 1e3)
    total_s = time.perf_counter() - total0
    return {
        "forward_ms": forward_s * 1e3 / iterations,
        "backward_ms": backward_s * 1e3 / iterations,
        "forward_backward_ms": total_s * 1e3 / iterations,
        "total_ms": total_s * 1e3,
    }
