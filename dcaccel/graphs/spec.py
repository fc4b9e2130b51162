"""One GraphSpec per graph: input/output names, static shapes, dtypes and sample inputs.

Export, engine profiles, buffer allocation, the checks against eager and the shape checks at run time all read
these. A graph's cached tensors (what the full graph writes and the shallow graph reads: one `feature` on a
U-Net, an image and a text residual on an MMDiT) are named in `GraphSpec.cache`; nothing below the families
knows their names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRAPHS = ("full", "shallow")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # a key of TORCH_DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))


@dataclass(frozen=True)
class GraphSpec:
    name: str  # "full" or "shallow"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cache: tuple[str, ...] = ()  # the cached tensors among the outputs (full) or inputs (shallow), in order

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def call_inputs(self) -> list[TensorSpec]:
        """The inputs a pipeline call supplies (everything but the cache)."""
        return [t for t in self.inputs if t.name not in self.cache]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.inputs + self.outputs}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {t.name: t.torch_dtype for t in self.inputs + self.outputs}

    def sample_inputs(self, device="cpu", seed: int = 0) -> dict[str, torch.Tensor]:
        """Inputs of the right shapes and dtypes with plausible values (for export, checks and warm-up)."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            if t.name == "timestep":
                x = torch.full(t.shape, 501.0)
            elif t.name == "time_ids":
                # SDXL's original size, crop and target size (the refiner's 5: aesthetic score for the target)
                values = [512.0, 512.0, 0.0, 0.0] + ([6.0] if t.shape[1] == 5 else [512.0, 512.0])
                x = torch.tensor(values).repeat(t.shape[0], 1)
            else:
                x = torch.randn(t.shape, generator=g)
            out[t.name] = x.to(device=device, dtype=t.torch_dtype)
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "cache": list(self.cache)}

    @classmethod
    def from_dict(cls, data: dict) -> "GraphSpec":
        return cls(str(data["name"]), tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in data["outputs"]), tuple(data.get("cache", ())))


def specs_to_dict(specs: dict[str, GraphSpec]) -> dict:
    return {name: spec.to_dict() for name, spec in specs.items()}


def specs_from_dict(data: dict) -> dict[str, GraphSpec]:
    return {name: GraphSpec.from_dict(spec) for name, spec in data.items()}


def cache_specs(specs: dict[str, GraphSpec]) -> list[TensorSpec]:
    """The cached tensors: outputs of the full graph that the shallow graph reads."""
    full = specs["full"]
    return [t for t in full.outputs if t.name in full.cache]


def static_input_shapes(specs: dict[str, GraphSpec]) -> dict[str, tuple[int, ...]]:
    """The shapes a call's inputs must have (the cache is not a call input)."""
    return {t.name: t.shape for s in specs.values() for t in s.call_inputs}


def pack_cache(tensors: list[torch.Tensor]):
    """The `feature` argument of a split graph: one tensor, or a tuple of them."""
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def unpack_cache(feature) -> list[torch.Tensor]:
    return [feature] if isinstance(feature, torch.Tensor) else list(feature)


def call_graph(graph: torch.nn.Module, spec: GraphSpec, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a split graph on named tensors; returns its named outputs (noise first, then the cache)."""
    kwargs = {t.name: inputs[t.name] for t in spec.call_inputs}
    if spec.name == "shallow" and spec.cache:
        kwargs["feature"] = pack_cache([inputs[name] for name in spec.cache])
    out = graph(**kwargs)
    if spec.name == "full":
        noise, feature = out
        return dict(zip(spec.output_names, [noise, *unpack_cache(feature)]))
    return {spec.output_names[0]: out}


class PositionalGraph(torch.nn.Module):
    """A graph whose forward takes the spec's inputs positionally and returns its outputs as a flat tuple (what
    exporters and engines want). The wrapped graph is `split`: an attribute named `graph` would clash with the
    FX graph of torch.export's GraphModule, and the dynamo exporter would fail."""

    def __init__(self, graph: torch.nn.Module, spec: GraphSpec):
        super().__init__()
        self.split = graph
        self.spec = spec

    def forward(self, *tensors):
        out = call_graph(self.split, self.spec, dict(zip(self.spec.input_names, tensors)))
        values = tuple(out[name] for name in self.spec.output_names)
        return values if len(values) > 1 else values[0]
