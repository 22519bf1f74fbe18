"""Solver states both ways: Caffe's SolverState (binary proto, or HDF5 via h5py) plus our sidecar.

Field mapping (caffe.proto SolverState; sgd_solver.cpp SnapshotSolverStateToBinaryProto / ToHDF5):

============  =================================================================================
iter          the iteration (updates done); must lie in [0, max_iter]
learned_net   the caffemodel as Caffe writes it (``<prefix>_iter_N.caffemodel``, relative to the
              working directory); we read only the file of that name beside the solverstate
history       h of every learnable blob, then (AdaDelta, Adam) h2 of every blob: CaffeSolver order
current_step  the multistep (and step) counter after the last GetLearningRate
============  =================================================================================

What Caffe has no field for goes to ``<state>.resnet_imagenet.pt`` (torch.save of plain types, read
with weights_only=True): the seed, the world size, every rank's random generators and TRAIN feed
positions, the TEST feeds, the smoothed-loss window, the fp16 scaler and the solver type. A state
without it (Caffe's) resumes the iteration, the schedule and the history exactly; the data restarts
from the first record and the random streams from the seed, as a Caffe resume does.
Our solverstates of version 1 (a torch zip holding everything) still resume.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.blob import array_to_blob, blob_to_array
from resnet_imagenet.util.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

SIDECAR = ".resnet_imagenet.pt"
SIDECAR_FORMAT = "resnet_imagenet.sidecar/2"
OLD_FORMAT = "resnet_imagenet.solverstate/1"  # a torch zip of everything, written before the sidecar
_ZIP, _HDF5 = b"PK\x03\x04", b"\x89HDF\r\n\x1a\n"
_MODEL = re.compile(r"[^/\\]+\.caffemodel(\.h5)?")


@dataclass
class SolverStateFile:
    """A solverstate read and checked: where the weights are and what the solver resumes from."""

    path: Path
    iter: int
    current_step: int
    model: Path  # the caffemodel (binary, or .caffemodel.h5) beside the solverstate
    history: list[torch.Tensor] | None  # Caffe's order; None for a version-1 state (``solver`` instead)
    solver: dict | None = None  # CaffeSolver.state_dict() (version 1, or filled by the trainer)
    extra: dict | None = None  # the sidecar: None for a state written by Caffe


def sidecar_path(state_path: str | os.PathLike) -> Path:
    return Path(f"{state_path}{SIDECAR}")


def to_proto(it: int, learned_net: str, history: list[torch.Tensor], current_step: int) -> caffe_pb2.SolverState:
    """caffe: SnapshotSolverStateToBinaryProto -- iter, learned_net, current_step, history (shape + data)."""
    st = caffe_pb2.SolverState(iter=it, learned_net=learned_net, current_step=current_step)
    st.history.extend(array_to_blob(h.detach().float().cpu().numpy()) for h in history)
    return st


def write_solverstate(
    path: Path, *, it: int, learned_net: str, history: list[torch.Tensor], current_step: int, extra: dict[str, Any]
) -> None:
    """The sidecar, then the SolverState (each atomically): a solverstate never exists without its sidecar."""
    buf = io.BytesIO()
    torch.save({"format": SIDECAR_FORMAT, "iter": it, "learned_net": Path(learned_net).name, **extra}, buf)
    atomic_write_bytes(sidecar_path(path), buf.getvalue())
    atomic_write_bytes(path, to_proto(it, learned_net, history, current_step).SerializeToString())


# --- reading --------------------------------------------------------------------------------------


def read_solverstate(path: str | os.PathLike, max_iter: int) -> SolverStateFile:
    """Read a solverstate of any of the three kinds (Caffe binary, Caffe HDF5, our version 1), every field checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing_state_message(path))
    head = path.open("rb").read(8)
    if head.startswith(_ZIP):
        st = _read_old(path)
    elif head == _HDF5:
        st = _read_hdf5(path)
    else:
        st = _read_proto(path)
    if not 0 <= st.iter <= max_iter:
        raise ValueError(f"{path}: iter {st.iter} is outside [0, max_iter {max_iter}]")
    if st.current_step < 0:
        raise ValueError(f"{path}: current_step {st.current_step} is negative")
    if not st.model.is_file():
        raise FileNotFoundError(f"{path}: its weights {st.model} are missing")
    if st.extra is None and st.history is not None:
        side = sidecar_path(path)
        if side.is_file():
            st.extra = _read_sidecar(side, st)
        else:
            log.warning(
                "%s: no %s beside it (a state written by Caffe?): resuming iteration, lr schedule and "
                "history exactly; the data starts from the first record, random streams from the seed",
                path,
                side.name,
            )
    return st


def _model_beside(path: Path, learned_net: Any, suffix: str) -> Path:
    """learned_net's file name beside the solverstate (the path as written is never opened)."""
    if learned_net is None or learned_net == "":
        stem = path.name.removesuffix(".h5").removesuffix(".solverstate")
        return path.with_name(stem + suffix)  # caffe: learned_net is optional; take the snapshot's own caffemodel
    if not isinstance(learned_net, str):
        raise ValueError(f"{path}: learned_net is a {type(learned_net).__name__}, not a file name")
    name = learned_net.replace("\\", "/").rsplit("/", 1)[-1]
    if not _MODEL.fullmatch(name):
        raise ValueError(f"{path}: learned_net {learned_net!r} does not name a .caffemodel file")
    return path.with_name(name)


def _read_proto(path: Path) -> SolverStateFile:
    st = caffe_pb2.SolverState()
    try:
        st.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"{path}: not a solverstate (Caffe SolverState or resnet-imagenet's): {e}") from None
    if not st.HasField("iter"):
        raise ValueError(f"{path}: not a solverstate (a SolverState has an iter)")
    history = []
    for i, b in enumerate(st.history):
        try:
            history.append(torch.from_numpy(blob_to_array(b).copy()))
        except ValueError as e:
            raise ValueError(f"{path}: history blob #{i}: {e}") from None
    model = _model_beside(path, st.learned_net if st.HasField("learned_net") else None, ".caffemodel")
    return SolverStateFile(path, st.iter, st.current_step, model, history)


def _read_hdf5(path: Path) -> SolverStateFile:
    """caffe: RestoreSolverStateFromHDF5 -- datasets iter, learned_net, current_step; group history/0..k-1."""
    import h5py  # only for Caffe's HDF5 snapshots

    try:
        with h5py.File(path, "r") as f:

            def scalar(key: str) -> int:
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    raise ValueError(f"no {key} dataset")
                v = np.asarray(f[key][()]).reshape(-1)
                if v.size != 1 or v.dtype.kind not in "iu":
                    raise ValueError(f"{key} is not one integer")
                return int(v[0])

            it = scalar("iter")
            step = scalar("current_step") if "current_step" in f else 0
            net = f["learned_net"][()] if "learned_net" in f else None
            net = net.decode("utf-8", "replace") if isinstance(net, bytes) else net
            group = f.get("history")
            if not isinstance(group, h5py.Group):
                raise ValueError("no history group")
            if sorted(group.keys()) != sorted(str(i) for i in range(len(group))):
                raise ValueError(f"history datasets {sorted(group.keys())} are not 0..{len(group) - 1}")
            history = [torch.from_numpy(np.asarray(group[str(i)][()], dtype=np.float32)) for i in range(len(group))]
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 solverstate ({e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: HDF5 solverstate: {e}") from None
    return SolverStateFile(path, it, step, _model_beside(path, net, ".caffemodel.h5"), history)


def read_caffemodel_h5(path: Path) -> caffe_pb2.NetParameter:
    """caffe: Net::ToHDF5 -- group data/<layer name>/<blob index>; as a NetParameter copy_from() takes."""
    import h5py

    net = caffe_pb2.NetParameter()
    try:
        with h5py.File(path, "r") as f:
            for name, group in f["data"].items():
                layer = net.layer.add(name=name)
                for j in range(len(group)):
                    layer.blobs.append(array_to_blob(np.asarray(group[str(j)][()], dtype=np.float32)))
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a Caffe HDF5 caffemodel ({e})") from None
    return net


def _load_torch(path: Path, what: str) -> dict:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a {what} ({e.__class__.__name__})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a {what}")
    return d


def _need(d: dict, key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    v = d.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
        got = "missing" if key not in d else f"a {type(v).__name__}"
        raise ValueError(f"{where}: field {key!r} is {got}")
    return v


def _check_extra(d: dict, where: Path) -> dict:
    """The run's own fields (sidecar or version 1): types, ranges, one entry per rank."""
    seed = _need(d, "seed", int, where)
    if not 0 <= seed < 2**63:
        raise ValueError(f"{where}: seed {seed} is out of range")
    world = _need(d, "world_size", int, where)
    if not 1 <= world <= 65536:
        raise ValueError(f"{where}: world_size {world} is out of range")
    for key in ("rng", "train_feeds"):
        if len(_need(d, key, list, where)) != world:
            raise ValueError(f"{where}: {key} has {len(d[key])} entries for world_size {world}")
    for i, r in enumerate(d["rng"]):
        if not isinstance(r, dict) or not isinstance(r.get("torch"), torch.Tensor):
            raise ValueError(f"{where}: rng[{i}] is not a saved random state")
    for key in ("train_feeds", "test_feeds"):
        for feeds in _need(d, key, list, where):
            if not isinstance(feeds, list) or not all(isinstance(f, dict) for f in feeds):
                raise ValueError(f"{where}: {key} holds something other than feed positions")
            for f in feeds:
                hdf5 = "layer" in f  # an HDF5Data layer's read position (net/layers/data.py position())
                if hdf5 and not all(isinstance(f.get(k), torch.Tensor) for k in ("file_order", "rows")):
                    raise ValueError(f"{where}: an HDF5Data position's file_order or rows is not a tensor")
                for k in ("offset", "current_file", "current_row") if hdf5 else ("epoch", "index"):
                    if not isinstance(f.get(k), int) or f[k] < 0:
                        raise ValueError(f"{where}: a feed position's {k} is {f.get(k)!r}")
    _need(d, "smoothing", dict, where)
    _need(d, "scaler", dict, where)
    return d


def _read_sidecar(side: Path, st: SolverStateFile) -> dict:
    d = _load_torch(side, "resnet-imagenet solverstate sidecar")
    if d.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{side}: not a resnet-imagenet solverstate sidecar (format {d.get('format')!r})")
    if _need(d, "iter", int, side) != st.iter or _need(d, "learned_net", str, side) != st.model.name:
        raise ValueError(f"{side}: written for iteration {d['iter']} / {d['learned_net']}, not its solverstate's")
    _need(d, "solver_type", str, side)
    return _check_extra(d, side)


def _read_old(path: Path) -> SolverStateFile:
    d = _load_torch(path, "solverstate (Caffe SolverState or resnet-imagenet's)")
    if d.get("format") != OLD_FORMAT:
        raise ValueError(f"{path}: not a solverstate written by resnet-imagenet train")
    it = _need(d, "iter", int, path)
    solver = _need(d, "solver", dict, path)
    _need(solver, "type", str, path)
    for key in ("history", "history2"):
        if not all(isinstance(h, torch.Tensor) for h in _need(solver, key, list, path)):
            raise ValueError(f"{path}: solver {key} holds something other than tensors")
    model = _model_beside(path, _need(d, "learned_net", str, path), ".caffemodel")
    extra = _check_extra(d, path)
    extra["solver_type"] = solver["type"]
    log.info("%s: a version-1 resnet-imagenet solverstate; the next snapshot is written as Caffe's SolverState", path)
    return SolverStateFile(path, it, 0, model, None, solver=solver, extra=extra)


def snapshot_iters(folder: Path, stem: str, suffix: str) -> list[int]:
    """The iterations N of ``<stem>_iter_N<suffix>`` files in ``folder``, sorted."""
    pat = re.compile(re.escape(stem) + r"_iter_(\d+)" + re.escape(suffix))
    return sorted(int(m.group(1)) for p in folder.glob(f"{stem}_iter_*{suffix}") if (m := pat.fullmatch(p.name)))


def missing_state_message(path: Path) -> str:
    """The line for a missing solverstate; says so when its caffemodel exists (a snapshot cut short)."""
    m = re.fullmatch(r"(.*)_iter_(\d+)\.solverstate(\.h5)?", path.name)
    if not m:
        return f"{path}: no such solverstate"
    model = path.with_name(f"{m.group(1)}_iter_{m.group(2)}.caffemodel{m.group(3) or ''}")
    if not model.is_file():
        return f"{path}: no such solverstate"
    done = [i for i in snapshot_iters(path.parent, m.group(1), ".solverstate") if i < int(m.group(2))]
    last = f"resume from {path.with_name(f'{m.group(1)}_iter_{done[-1]}.solverstate')}" if done else "no earlier state"
    return (
        f"{path}: no such solverstate, but its caffemodel {model.name} exists: the snapshot at iteration "
        f"{m.group(2)} was interrupted before its solver state was written "
        f"({last}, or fine-tune with --weights {model})"
    )
