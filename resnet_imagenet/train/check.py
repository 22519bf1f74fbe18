"""``train --check``: every problem of a run found before training, one line each (not only the first).

First what the solver's nets and DBs show without building anything (train/preflight.py) and whether the
--weights files reach the net; when those are clean, the run is built as training would build it (nets,
feeds, memory, GPUs, a --snapshot), which stops at its first problem.
"""

from __future__ import annotations

import logging

from resnet_imagenet.data.shapes import data_input_shapes
from resnet_imagenet.net.net import CaffeNet
from resnet_imagenet.net.weights import load_weights
from resnet_imagenet.proto.text import TRAIN
from resnet_imagenet.train import preflight
from resnet_imagenet.train.options import TrainOptions
from resnet_imagenet.train.setup import load_solver, solver_nets

log = logging.getLogger(__name__)

ERRORS = (ValueError, OSError)  # what bad input raises (cli.py prints these in one line)


def _weights_problems(opts: TrainOptions, train_param) -> list[str]:
    """--weights that give the TRAIN net nothing (net/weights.py load_weights, as fine-tuning loads them)."""
    if not opts.weights:
        return []
    try:
        net = CaffeNet(train_param, TRAIN, input_shapes=data_input_shapes(train_param.layer, missing_ok=True))
    except ERRORS:
        return []  # the net itself is reported by the full build
    try:
        load_weights(net, opts.weights, missing="finetune")
    except ERRORS as e:
        return [str(e)]
    return []


def check(opts: TrainOptions) -> list[str]:
    """The problems ``train --check`` finds, in order; empty when the run would start."""
    from resnet_imagenet.train.trainer import train

    try:
        sp = load_solver(opts.solver)
        train_param, test_params = solver_nets(sp, check_data=False)
    except ERRORS as e:
        return [str(e)]  # without the solver's nets nothing else can be checked
    refusals, doubts = preflight.problems(sp, train_param, test_params)
    found = refusals + doubts + _weights_problems(opts, train_param)
    if found:
        return found
    try:
        train(opts)  # builds the run as training would (logs "Check passed")
    except ERRORS as e:
        found.append(str(e))
    return found
