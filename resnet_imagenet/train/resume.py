"""Resuming: a read solverstate checked against the solver and net, its weights, and each rank's share of it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.solver.solver import CaffeSolver
from resnet_imagenet.train.setup import Feeds
from resnet_imagenet.train.snapshot import set_rng_state
from resnet_imagenet.train.solverstate import SolverStateFile, read_caffemodel_h5

log = logging.getLogger(__name__)


def check_resume(state: SolverStateFile, solver: CaffeSolver, sp: caffe_pb2.SolverParameter) -> None:
    """Refuse, in one line naming the file, a state for another solver type, net or schedule; fills state.solver."""
    where = str(state.path)
    saved_type = state.extra.get("solver_type") if state.extra is not None else None
    if saved_type is not None and saved_type != sp.type:
        raise ValueError(f"{where}: solverstate is for solver type {saved_type!r}, the solver says {sp.type!r}")
    if sp.lr_policy == "multistep" and state.current_step > len(sp.stepvalue):
        raise ValueError(
            f"{where}: current_step {state.current_step} is past the solver's {len(sp.stepvalue)} stepvalue(s)"
        )
    try:
        if state.solver is None:
            state.solver = solver.state_from_caffe(state.history, where)
        else:
            solver.check_state_dict(state.solver)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def resume_weights(state: SolverStateFile) -> Path | caffe_pb2.NetParameter:
    """The caffemodel to resume from: a path, or a NetParameter read from Caffe's HDF5 weights."""
    if state.model.name.endswith(".h5"):
        return read_caffemodel_h5(state.model)
    return state.model


def load_rank_state(state: dict[str, Any], feeds: Feeds, *, rank: int, world_size: int) -> None:
    """This rank's TRAIN feed positions and random generators from a solverstate.

    With another process count the run goes on from the same epoch and the same share of it: the
    samples the old ranks took in the current epoch (position x old world size) are split over the new
    ranks, and each rank's random streams start from (seed, rank) as in a fresh run. That is not
    bit-exact with an uninterrupted run, so it is warned about.
    """
    old = state["world_size"]
    if old == world_size:
        feeds.load_state_dict(state["train_feeds"][rank])
        set_rng_state(state["rng"][rank])
        return
    log.warning(
        "resuming %d processes from a snapshot of %d: the data order and random streams are not "
        "those of an uninterrupted run",
        world_size,
        old,
    )
    # every old rank took the same number of samples
    # an HDF5Data position ("layer") counts rows over all ranks already
    saved = state["train_feeds"][0]
    feeds.load_state_dict([fs if "layer" in fs else {**fs, "index": int(fs["index"]) * old // world_size}
                           for fs in saved])  # fmt: skip
    torch.manual_seed(int(state["seed"]) + rank)  # as a fresh run seeds each rank
