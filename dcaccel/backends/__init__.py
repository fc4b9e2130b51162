"""Backends behind one small protocol (see base.Runner), looked up by name; heavy packages load lazily."""

from __future__ import annotations

import importlib

BACKENDS = {
    "eager": "dcaccel.backends.eager",
    "onnxruntime": "dcaccel.backends.onnxruntime",
    "tensorrt": "dcaccel.backends.tensorrt",
    "torch_compile": "dcaccel.backends.torch_compile",
}


def get_backend(name: str):
    """The backend module `name`; it provides create_runner(unet, branch, **options) and, if it builds
    artifacts, build(unet, spec, directory, **options)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])
