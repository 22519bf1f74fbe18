"""Shared fixtures. Interop tests read real published Caffe files from ../shared/reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
