"""PyTorch eager: the split graphs as they are. The reference point for every other backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graphs.buffers import CacheBuffers
from ..graphs.spec import GraphSpec, call_graph
from .base import BackendOptions

NAME = "eager"
VERSIONS = ()
TOLERANCE = {"float32": (0.0, 0.0), "float16": (0.0, 0.0), "bfloat16": (0.0, 0.0)}
STRICT = True
FILES_REQUIRED = False


@dataclass(frozen=True)
class Options(BackendOptions):
    backend = NAME


class EagerRunner:
    follows_settings = True  # refit cuts the graphs again, so they take the model's new settings (FreeU)
    static_shapes = None

    def __init__(self, graphs: dict[str, torch.nn.Module], specs: dict[str, GraphSpec]):
        self.graphs, self.specs = graphs, specs
        self.cache_buffers = CacheBuffers(specs["full"].cache)
        self.loras: list[dict] = []  # the fused LoRAs (the engine layer and dcaccel.lora record them here)
        self.extras: dict = {}  # graphs a family adds (skip-layer guidance), made at their first use

    @property
    def cache(self) -> dict[str, torch.Tensor]:
        return self.cache_buffers.tensors

    @property
    def feature(self) -> torch.Tensor | None:
        return self.cache.get("feature")

    def refit(self, graphs) -> float:
        """Take the new graphs: they share the model's parameters, so nothing is copied (cut again rather than
        kept, so that modules replaced rather than changed are seen too)."""
        self.graphs = graphs
        self.extras.clear()
        return 0.0

    def run_full(self, inputs):
        out = call_graph(self.graphs["full"], self.specs["full"], inputs)
        self.cache_buffers.store(out)
        return out[self.specs["full"].output_names[0]]

    def run_shallow(self, inputs):
        out = call_graph(self.graphs["shallow"], self.specs["shallow"], {**inputs, **self.cache_buffers.get()})
        return out[self.specs["shallow"].output_names[0]]

    def run_extra(self, key, make, inputs):
        """A graph outside the DeepCache schedule (e.g. skip-layer guidance), made by `make()` at its first use."""
        if key not in self.extras:
            self.extras[key] = make()
        with torch.no_grad():
            return self.extras[key](**inputs)

    def close(self) -> None:
        pass


def build(graphs, specs, directory, options):
    raise ValueError("backend 'eager' builds nothing; engine backends are onnxruntime, tensorrt and torch_compile")


def load(graphs, specs, options: Options, directory=None, graph_files=None) -> EagerRunner:
    return EagerRunner(graphs, specs)
