"""The versions of the libraries that shape a step's numbers, as every record carries them."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

_VERSIONED = ("torch", "scikit-learn", "onnx", "onnxruntime", "skl2onnx", "numpy", "torch-pruning")


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return tuple(out.items())


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers, without importing them (read once
    per process: an installed package does not change under a running one)."""
    return dict(_versions())
