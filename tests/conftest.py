"""Shared fixtures. Interop tests read real published Caffe files from ../shared/reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples every run, so CI passes or fails on the code, not on the draw;
# HYPOTHESIS_PROFILE=explore draws fresh random examples (run it when touching a parser or decoder).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]


def _find_reference() -> Path | None:
    candidates = [
        REPO.parent / "shared" / "reference",
        Path(os.environ.get("RESNET_IMAGENET_REFERENCE", "/nonexistent")),
    ]
    for c in candidates:
        if (c / "SOURCES.md").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference (real Caffe prototxts, mean files, a log); skip when it is absent."""
    ref = _find_reference()
    if ref is None:
        pytest.skip("real Caffe reference files not found (../shared/reference or $RESNET_IMAGENET_REFERENCE)")
    return ref


def _find_bvlc() -> Path | None:
    candidates = [
        REPO.parent / "shared" / "bvlc-caffe",
        Path(os.environ.get("RESNET_IMAGENET_BVLC", "/nonexistent")),
    ]
    for c in candidates:
        if (c / "SOURCES.md").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def bvlc_dir() -> Path:
    """../shared/bvlc-caffe (BVLC Caffe's example and model prototxts); skip when it is absent."""
    found = _find_bvlc()
    if found is None:
        pytest.skip("BVLC Caffe's examples not found (../shared/bvlc-caffe or $RESNET_IMAGENET_BVLC)")
    return found
