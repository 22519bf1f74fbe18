"""``demo`` end to end on a very small setting: every step runs as its command and leaves its outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_imagenet.tools.demo import MARKER, TRAIN_SH, DemoConfig, demo_commands, run_demo


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
                "snapshots/resnet_tiny_2x_iter_1.caffemodel", "train.sh"):  # fmt: skip
        assert (out / rel).is_file(), rel
    # train.sh logged to a dated file and keeps the stable name linked to the newest
    link = out / "logs/resnet_tiny_resnet_tiny_.log"
    assert link.is_symlink() and link.resolve().name.startswith("resnet_tiny_resnet_tiny__20")
    for rel in ():  # fmt: skip
        assert (out / rel).is_file(), rel
    # A rerun replaces the demo's own folder; a folder the demo did not make is refused.
    (out / MARKER).unlink()
    with pytest.raises(FileExistsError):
        run_demo(DemoConfig(out=out, train_per_class=1, val_per_class=1, max_iter=1))


def _readme_demo_lines() -> list[str]:
    """The command lines of README's "The demo" block: continuations joined, trailing comments dropped."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## The demo", 1)[1].split("```", 2)[1]
    joined = block.replace("\\\n", " ")
    return [" ".join(line.split("  #", 1)[0].split()) for line in joined.splitlines() if line.strip()]


def test_readme_demo_block_is_what_the_demo_runs() -> None:
    assert _readme_demo_lines() == [line for _, line in demo_commands(DemoConfig())]


def test_demo_folder_has_its_train_sh() -> None:
    """demo_out/ carries train.sh, the same script as the checkout's ./train.sh (a link to the package's)."""
    repo = Path(__file__).resolve().parents[1]
    assert (repo / "train.sh").resolve() == TRAIN_SH
    assert TRAIN_SH.read_bytes().startswith(b"#!/usr/bin/env bash")
