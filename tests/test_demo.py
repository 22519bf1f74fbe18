"""``demo`` end to end on a very small setting: every step runs as its command and leaves its outputs."""

from __future__ import annotations

import pytest

from resnet_imagenet.tools.demo import MARKER, DemoConfig, run_demo


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys) -> None:
    out = tmp_path / "demo_out"
    res = run_demo(DemoConfig(out=out, train_per_class=3, val_per_class=2, max_iter=4, classify_count=2))
    text = capsys.readouterr().out
    assert all(0.0 <= t <= 1.0 for t in (res.top1_before, res.top1_pruned, res.top1_after))
    for step in ("$ resnet-imagenet demo_data", "$ resnet-imagenet convert_imageset", "$ resnet-imagenet test",
                 "$ resnet-imagenet classify",
                 "$ resnet-imagenet prune", "$ resnet-imagenet plot_log", "top-1 on the 20 val images"):  # fmt: skip
        assert step in text
    for rel in ("data/tiny_train_lmdb/data.mdb", "data/tiny_val_lmdb/data.mdb", "data/tiny_mean.binaryproto",
                "snapshots/resnet_tiny_iter_4.caffemodel", "loss_curve.png", MARKER,
                "logs/resnet_tiny_resnet_tiny_.log.train", "prototxt_like/resnet_tiny_2x/prune_report.json",
                "prototxt_like/resnet_tiny_2x/resnet_tiny_2x_pruned.caffemodel",
                "snapshots/resnet_tiny_2x_iter_1.caffemodel"):  # fmt: skip
        assert (out / rel).is_file(), rel
    # A rerun replaces the demo's own folder; a folder the demo did not make is refused.
    (out / MARKER).unlink()
    with pytest.raises(FileExistsError):
        run_demo(DemoConfig(out=out, train_per_class=1, val_per_class=1, max_iter=1))
