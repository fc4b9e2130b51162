"""The protocol every backend's runner follows, and the errors they share."""

from __future__ import annotations

from typing import Protocol

import torch


class Runner(Protocol):
    """Runs the full and the shallow graph. The full graph writes the cached feature into `feature`, one buffer
    for the life of the runner; the shallow graph reads it. Inputs are keyed by the GraphSpec input names."""

    feature: torch.Tensor | None
    static_shapes: dict[str, tuple[int, ...]] | None  # None: any shape; else the only shapes accepted

    def run_full(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def run_shallow(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...


class MissingDependencyError(ImportError):
    """An optional package a backend needs is not installed."""


def require(module: str, backend: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"backend {backend!r} needs the package {module!r} ({e}); install it with: pip install 'dcaccel[{extra}]'"
        ) from e


def check_static_shapes(expected: dict[str, tuple[int, ...]], inputs: dict[str, torch.Tensor], what: str) -> None:
    """A clear error when a call's shapes differ from those an engine was built for."""
    diffs = [
        f"{name}: got {tuple(inputs[name].shape)}, built for {shape}"
        for name, shape in expected.items()
        if name in inputs and tuple(inputs[name].shape) != tuple(shape)
    ]
    if diffs:
        raise ValueError(
            f"{what} has static shapes and cannot run this call ({'; '.join(diffs)}). Build or enable it for the "
            "call's height, width and batch (batch = images x 2 with classifier-free guidance)."
        )
