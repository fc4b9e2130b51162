"""Preallocated buffers: the cached feature lives in one tensor for the life of a runner."""

from __future__ import annotations

import torch


class FeatureBuffer:
    """One tensor that every full step writes into and every shallow step reads. It is allocated at the first
    full step (or up front, from a spec) and reallocated only if a later call changes the shape."""

    def __init__(self, shape: tuple[int, ...] | None = None, dtype=torch.float32, device="cpu"):
        self.tensor = torch.empty(shape, dtype=dtype, device=device) if shape is not None else None
        self.allocations = 0 if shape is None else 1

    def store(self, feature: torch.Tensor) -> None:
        t = self.tensor
        if t is None or t.shape != feature.shape or t.dtype != feature.dtype or t.device != feature.device:
            self.tensor = torch.empty_like(feature, memory_format=torch.contiguous_format)
            self.allocations += 1
        self.tensor.copy_(feature)

    def get(self) -> torch.Tensor:
        if self.tensor is None:
            raise RuntimeError("no cached feature: a shallow step ran before any full step (step 0 is always full)")
        return self.tensor


def allocate(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], device) -> dict[str, torch.Tensor]:
    """One tensor per named graph input/output, allocated once and bound once."""
    return {name: torch.empty(shape, dtype=dtypes[name], device=device) for name, shape in shapes.items()}


def allocate_graph_buffers(specs, device) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """Buffers for every input and output of the full and shallow graphs (one `feature` tensor that the full
    graph writes and the shallow graph reads), and the static shapes a call's inputs must have."""
    shapes, dtypes = {}, {}
    for spec in specs.values():
        shapes.update(spec.shapes())
        dtypes.update(spec.dtypes())
    static = {t.name: t.shape for s in specs.values() for t in s.inputs if t.name != "feature"}
    return allocate(shapes, dtypes, device), static
