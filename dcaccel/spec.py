"""One GraphSpec per graph: input/output names, static shapes, dtypes and sample inputs.

Export, engine profiles, buffer allocation and the shape checks at run time all read these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import BuildConfig
from .split import ShallowUNet, feature_shape, num_branches

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


@dataclass(frozen=True)
class GraphSpec:
    name: str  # "full" or "shallow"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

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
                x = torch.tensor([512.0, 512.0, 0.0, 0.0, 512.0, 512.0]).repeat(t.shape[0], 1)
            else:
                x = torch.randn(t.shape, generator=g)
            out[t.name] = x.to(device=device, dtype=t.torch_dtype)
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


def vae_scale_factor(vae_config) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def graph_specs(unet, build: BuildConfig, vae_scale: int = 8, text_len: int = 77) -> dict[str, GraphSpec]:
    """The full and shallow GraphSpecs for `unet` at the build's resolution, batch and dtype."""
    n = num_branches(unet)
    if not 0 <= build.branch < n:
        raise ValueError(f"branch must be in 0..{n - 1} for this U-Net, got {build.branch}")
    for name in ("height", "width"):
        if getattr(build, name) % vae_scale:
            raise ValueError(f"{name} must be a multiple of the VAE's factor {vae_scale}, got {getattr(build, name)}")
    cfg = unet.config
    b, h, w = build.graph_batch, build.height // vae_scale, build.width // vae_scale
    dt = build.dtype
    inputs = [
        TensorSpec("sample", (b, cfg.in_channels, h, w), dt),
        TensorSpec("timestep", (b,), "float32"),
        TensorSpec("encoder_hidden_states", (b, text_len, cfg.cross_attention_dim), dt),
    ]
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs += [TensorSpec("text_embeds", (b, pooled), dt), TensorSpec("time_ids", (b, 6), dt)]
    noise = TensorSpec("noise", (b, cfg.out_channels, h, w), dt)
    feature = TensorSpec("feature", feature_shape(unet, build.branch, b, h, w), dt)
    shallow_inputs = inputs[:2] + [feature] + inputs[3:]
    if ShallowUNet(unet, build.branch).uses_encoder_hidden_states:
        shallow_inputs.insert(2, inputs[2])
    return {
        "full": GraphSpec("full", tuple(inputs), (noise, feature)),
        "shallow": GraphSpec("shallow", tuple(shallow_inputs), (noise,)),
    }


class PositionalGraph(torch.nn.Module):
    """A graph whose forward takes the spec's inputs positionally (what exporters and engines want)."""

    def __init__(self, graph: torch.nn.Module, spec: GraphSpec):
        super().__init__()
        self.graph = graph
        self.names = spec.input_names

    def forward(self, *tensors):
        return self.graph(**dict(zip(self.names, tensors)))
