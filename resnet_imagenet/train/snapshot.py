"""Snapshots: ``<prefix>_iter_<N>.caffemodel`` (Caffe's weights) + ``<prefix>_iter_<N>.solverstate``.

The solverstate is Caffe's SolverState (iter, learned_net, history, current_step: ``caffe train
-snapshot`` resumes it); what an exact resume needs beyond it (random generators of every rank, data
positions, the display window, ...) goes to the sidecar ``<N>.solverstate.resnet_imagenet.pt``
(train/solverstate.py has the field mapping). learned_net is read as a file name beside the
solverstate, so a moved snapshot folder works. Every file is written by rank 0 through a temporary
name and a rename (resnet_imagenet.util.atomic): caffemodel, sidecar, solverstate in that order, so a
kill at any moment leaves the previous snapshot complete, and a solverstate never lacks its parts.
Temporaries left by a killed writer (``.<name>.tmp-<pid>-*``) are removed by the next snapshot
once no process of that pid is alive.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.train.solverstate import SolverStateFile, read_solverstate, write_solverstate
from resnet_imagenet.util import atomic
from resnet_imagenet.util.atomic import atomic_path

log = logging.getLogger(__name__)

DEFAULT_DIR = "snapshots"


class SnapshotError(RuntimeError):
    """A snapshot could not be written (disk full, a folder in the way...); every rank stops with it."""


def resolve_snapshot_prefix(sp: caffe_pb2.SolverParameter, solver_path: str | os.PathLike) -> str:
    """caffe: UpgradeSnapshotPrefixProperty -- unset: ``snapshots/<name>``; a folder: ``folder/<name>``.

    ``<name>`` is the solver file's name without ``.prototxt`` and a trailing ``_solver``.

    Relative prefixes stay relative to the working directory (the project root), as Caffe's do.
    """
    stem = Path(solver_path).stem
    if stem.endswith("_solver"):
        stem = stem[: -len("_solver")]  # resnet_50_solver.prototxt -> snapshots/resnet_50_iter_N
    if not sp.HasField("snapshot_prefix") or not sp.snapshot_prefix:
        return str(Path(DEFAULT_DIR) / stem)
    prefix = sp.snapshot_prefix
    if prefix.endswith("/") or Path(prefix).is_dir():
        return str(Path(prefix) / stem)
    return prefix


def snapshot_paths(prefix: str, it: int) -> tuple[Path, Path]:
    """caffe: Solver::SnapshotFilename -- ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate``."""
    return Path(f"{prefix}_iter_{it}.caffemodel"), Path(f"{prefix}_iter_{it}.solverstate")


# --- random generators as plain types (so weights_only loading works) --------------------------


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python generator states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the generators rng_state() captured (CUDA's: all devices when the count matches, else the current)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"][0])


# --- writing and reading ------------------------------------------------------------------------


def save_snapshot(
    net: torch.nn.Module,
    prefix: str,
    it: int,
    *,
    history: list[torch.Tensor],
    current_step: int,
    extra: dict[str, Any],
) -> tuple[Path, Path]:
    """Write the caffemodel, then the sidecar and the SolverState naming it; each atomically. Caffe's log lines."""
    model_path, state_path = snapshot_paths(prefix, it)
    remove_stale_temporaries(model_path.parent, Path(prefix).name)
    log.info("Snapshotting to binary proto file %s", model_path)
    with atomic_path(model_path) as tmp:
        net.save_caffemodel(tmp)
    log.info("Snapshotting solver state to binary proto file %s", state_path)
    # caffe: learned_net is the caffemodel's name as Snapshot made it (the prefix path)
    write_solverstate(
        state_path, it=it, learned_net=str(model_path), history=history, current_step=current_step, extra=extra
    )
    return model_path, state_path


def load_solverstate(path: str | os.PathLike, max_iter: int) -> SolverStateFile:
    """Read a solverstate (Caffe's binary or HDF5, or ours of version 1) and locate its caffemodel."""
    return read_solverstate(path, max_iter)


def remove_stale_temporaries(folder: Path, stem: str) -> list[Path]:
    """Remove the ``.<stem>_iter_<N>.*.tmp-<pid>-*`` temporaries of snapshot writers that are no longer running
    (a kill mid-snapshot): util.atomic's rule (a live pid, or another host's, keeps its file)."""
    return atomic.remove_stale_temporaries(folder / stem, name_glob=f"{atomic.glob_escape(stem)}_iter_[0-9]*.*")
