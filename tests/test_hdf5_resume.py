"""A net fed by HDF5Data resumes exactly: the snapshot keeps each HDF5Data layer's read position."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_imagenet.train.trainer import TrainOptions, train

h5py = pytest.importorskip("h5py")

NET = """name: "h5"
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TRAIN }
  hdf5_data_param { source: "train.txt" batch_size: 3 shuffle: %s } }
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TEST }
  hdf5_data_param { source: "test.txt" batch_size: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
SOLVER = """net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 max_iter: %d snapshot: 4
snapshot_prefix: "snap/h5" display: 1 random_seed: 5 solver_mode: CPU test_iter: 1 test_interval: 4
"""


@pytest.mark.parametrize("shuffle", ["false", "true"])
def test_resume_with_hdf5_data_is_exact(tmp_path, monkeypatch, caplog, shuffle):
    rng = np.random.default_rng(0)
    for split, files in (("train", 2), ("test", 1)):
        names = []
        for k in range(files):  # 5 rows a file, batches of 3: the snapshot falls inside a file
            with h5py.File(tmp_path / f"{split}{k}.h5", "w") as f:
                f["data"] = rng.standard_normal((5, 4)).astype(np.float32)
                f["label"] = (np.arange(5) % 2).astype(np.float32)
            names.append(str(tmp_path / f"{split}{k}.h5"))
        (tmp_path / f"{split}.txt").write_text("\n".join(names) + "\n")
    monkeypatch.chdir(tmp_path)
    Path("net.prototxt").write_text(NET % shuffle)

    def run(max_iter: int, resume: str | None = None) -> None:
        Path("solver.prototxt").write_text(SOLVER % max_iter)
        with caplog.at_level(logging.INFO):
            assert train(TrainOptions(solver="solver.prototxt", snapshot=resume, workers=0, gpu="cpu")) == 0

    run(9)
    final = Path("snap/h5_iter_9.caffemodel").read_bytes()
    side = torch.load("snap/h5_iter_4.solverstate.resnet_imagenet.pt", weights_only=True)
    pos = side["train_feeds"][0][-1]
    assert pos["layer"] == "data" and pos["offset"] == 12  # 4 batches of 3 rows
    Path("snap").rename("straight")
    run(4)
    run(9, resume="snap/h5_iter_4.solverstate")
    assert Path("snap/h5_iter_9.caffemodel").read_bytes() == final
