"""Snapshots: ``<prefix>_iter_<N>.caffemodel`` (Caffe's weights) + ``<prefix>_iter_<N>.solverstate``.

The solverstate is a torch file that ``torch.load(weights_only=True)`` reads: the iteration, the
solver's history blobs, the random generators of every rank, the data feeds' positions and the
display window, i.e. everything an exact resume needs. It names its caffemodel by file name
(caffe: SolverState.learned_net), resolved beside the solverstate, so a moved snapshot folder works.
Both files are written by rank 0 through a temporary name and a rename (resnet_imagenet.util.atomic):
a kill at any moment leaves the previous snapshot pair intact. What goes into the state is the
trainer's (Trainer.state_dict); this module writes, reads and names the files.
"""

from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.util.atomic import atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "resnet_imagenet.solverstate/1"
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


def save_snapshot(net: torch.nn.Module, state: dict[str, Any], prefix: str, it: int) -> tuple[Path, Path]:
    """Write the caffemodel, then the solverstate that names it; each atomically. Caffe's log lines."""
    model_path, state_path = snapshot_paths(prefix, it)
    log.info("Snapshotting to binary proto file %s", model_path)
    with atomic_path(model_path) as tmp:
        net.save_caffemodel(tmp)
    log.info("Snapshotting solver state to binary proto file %s", state_path)
    full = {"format": FORMAT, "iter": it, "learned_net": model_path.name, **state}
    buf = io.BytesIO()
    torch.save(full, buf)
    atomic_write_bytes(state_path, buf.getvalue())
    return model_path, state_path


def load_solverstate(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Read a solverstate (weights_only) and locate its caffemodel. Returns (state, caffemodel path)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such solverstate")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: not a solverstate written by resnet-imagenet train ({e.__class__.__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a solverstate written by resnet-imagenet train")
    model = path.parent / state["learned_net"]
    if not model.is_file():
        raise FileNotFoundError(f"{path}: its weights {model} are missing")
    return state, model
