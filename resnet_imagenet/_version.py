"""The package version: one place, read by pyproject (dynamic), --version and the LMDB metadata."""

__version__ = "0.1.0"
