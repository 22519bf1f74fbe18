"""Caffe's TEST pass (Solver::TestAll / Test): the mean of every output of each TEST net over test_iter batches."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.train.display import flat_outputs, g, log_outputs
from resnet_imagenet.train.setup import Feeds

log = logging.getLogger(__name__)


def run_test(
    net: CaffeNet,
    feeds: Feeds,
    test_iter: int,
    *,
    it: int,
    index: int,
    compute_loss: bool,
    stopped: Callable[[], bool],
) -> None:
    """caffe: Solver::Test -- TEST net #index over test_iter batches; ``stopped()`` true interrupts it."""
    log.info("Iteration %d, Testing net (#%d)", it, index)
    scores, counts, loss = None, {}, 0.0
    # fp32 even under AMP: bf16 logits tie often, and Caffe's Accuracy counts ties against the label
    with torch.no_grad():
        for _ in range(test_iter):
            if stopped():
                log.info("Test interrupted.")
                return
            out = net(**feeds.next())
            vec, counts = flat_outputs(net, out)
            scores = vec if scores is None else scores + vec
            if compute_loss:
                loss += float(net.loss(out))
    if compute_loss:
        log.info("Test loss: %s", g(loss / test_iter))
    if scores is not None:
        log_outputs(net, (scores / test_iter).tolist(), counts, "Test")


def test_all(
    sp: caffe_pb2.SolverParameter, nets: list[CaffeNet], feeds: list[Feeds], *, it: int, stopped: Callable[[], bool]
) -> None:
    """caffe: Solver::TestAll -- every TEST net for its test_iter batches (rank 0 alone)."""
    for i, (net, f) in enumerate(zip(nets, feeds)):
        run_test(net, f, sp.test_iter[i], it=it, index=i, compute_loss=sp.test_compute_loss, stopped=stopped)
