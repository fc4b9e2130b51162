"""Backends behind one small protocol (see base), looked up by name; heavy packages load lazily."""

from __future__ import annotations

import importlib

BACKENDS = {
    "eager": "dcaccel.backends.eager",
    "onnxruntime": "dcaccel.backends.onnxruntime",
    "tensorrt": "dcaccel.backends.tensorrt",
    "torch_compile": "dcaccel.backends.torch_compile",
}


def get_backend(name: str):
    """The backend module `name` (see backends.base for what it provides)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])
