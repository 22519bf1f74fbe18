"""Every layer type has tests: each type in the layer registry (and each data-layer type net.py handles
without a class) must be a key of some tests/test_layers_<family>.py module's VALUE_CASES and of some
module's GRAD_CASES (the convention those modules share). A new type without cases fails here, by name."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from resnet_imagenet.net.layers import LAYERS
from resnet_imagenet.proto.text import DATA_LAYER_TYPES

FAMILY_MODULES = sorted(p.stem for p in Path(__file__).parent.glob("test_layers_*.py"))


def _cases(kind: str) -> dict[str, list[str]]:
    """type -> the family modules whose ``kind`` dict (VALUE_CASES or GRAD_CASES) has cases for it."""
    found: dict[str, list[str]] = {}
    for stem in FAMILY_MODULES:
        module = importlib.import_module(f"tests.{stem}")
        cases = getattr(module, kind, None)
        assert isinstance(cases, dict), f"tests/{stem}.py defines no {kind} dict"
        for layer_type, items in cases.items():
            assert items, f"tests/{stem}.py: {kind}[{layer_type!r}] is empty"
            found.setdefault(layer_type, []).append(stem)
    return found


def registered_types() -> set[str]:
    return set(LAYERS) | set(DATA_LAYER_TYPES)


def test_family_modules_exist():
    assert {"test_layers_neuron", "test_layers_common", "test_layers_vision"} <= set(FAMILY_MODULES)


@pytest.mark.parametrize("kind", ["VALUE_CASES", "GRAD_CASES"])
def test_every_registered_type_has_cases(kind):
    found = _cases(kind)
    missing = sorted(registered_types() - set(found))
    assert not missing, f"layer types without {kind} in tests/test_layers_*.py: {', '.join(missing)}"


@pytest.mark.parametrize("kind", ["VALUE_CASES", "GRAD_CASES"])
def test_no_cases_for_unknown_types(kind):
    unknown = sorted(set(_cases(kind)) - registered_types())
    assert not unknown, f"{kind} keys that are not registered layer types: {', '.join(unknown)}"
