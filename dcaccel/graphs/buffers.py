"""Preallocated buffers: the cached tensors live in one buffer each for the life of a runner."""

from __future__ import annotations

import torch

from .spec import GraphSpec, static_input_shapes


class CacheBuffers:
    """The named tensors every full step writes and every shallow step reads. Allocated up front from the specs
    (static-shape runners) or at the first full step (eager), and reallocated only if a later call changes a
    shape (eager only: static runners refuse other shapes before they get here)."""

    def __init__(self, names: tuple[str, ...], specs: dict[str, GraphSpec] | None = None, device="cpu"):
        self.names = tuple(names)
        self.tensors: dict[str, torch.Tensor] = {}
        self.allocations = 0
        if specs is not None:
            full = specs["full"]
            for t in full.outputs:
                if t.name in self.names:
                    self.tensors[t.name] = torch.empty(t.shape, dtype=t.torch_dtype, device=device)
                    self.allocations += 1

    def store(self, values: dict[str, torch.Tensor]) -> None:
        for name in self.names:
            value = values[name]
            t = self.tensors.get(name)
            if t is None or t.shape != value.shape or t.dtype != value.dtype or t.device != value.device:
                self.tensors[name] = t = torch.empty_like(value, memory_format=torch.contiguous_format)
                self.allocations += 1
            t.copy_(value)

    def get(self) -> dict[str, torch.Tensor]:
        if len(self.tensors) < len(self.names):
            raise RuntimeError("no cached feature: a shallow step ran before any full step (step 0 is always full)")
        return self.tensors


def allocate_graph_buffers(specs: dict[str, GraphSpec], device) -> tuple[dict[str, torch.Tensor],
                                                                          dict[str, tuple[int, ...]]]:
    """One tensor for every input and output of the full and shallow graphs, allocated once and bound once (a
    cached tensor is one buffer: the full graph writes it, the shallow graph reads it), and the static shapes a
    call's inputs must have."""
    shapes, dtypes = {}, {}
    for spec in specs.values():
        shapes.update(spec.shapes())
        dtypes.update(spec.dtypes())
    buffers = {name: torch.empty(shape, dtype=dtypes[name], device=device) for name, shape in shapes.items()}
    return buffers, static_input_shapes(specs)
