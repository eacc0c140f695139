"""Files that ship inside installed Python packages (weights, sample photos), found without importing the package:
some of them import dependencies vqtok never installs (foolbox's eagerpy, deep-sort's opencv)."""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def vqtok_version() -> str:
    """The installed vqtok's version (pyproject.toml's), "unknown" in a source tree that was never installed."""
    try:
        return version("vqtok")
    except PackageNotFoundError:
        return "unknown"


def package_dir(package: str) -> Path | None:
    """The installed directory of `package`, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()
