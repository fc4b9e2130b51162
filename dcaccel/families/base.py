"""What a model family tells the rest of dcaccel: which pipeline attribute is the denoiser, which pipelines, how
it is checked and cut, the graphs' specs, and how a denoiser call's arguments become graph inputs."""

from __future__ import annotations

import json

import torch

from ..config import BuildConfig, DeepCacheConfig
from ..graphs.spec import GraphSpec


# Set by dcaccel.enable(..., release_weights=True) on the models whose weights it freed (the denoiser, ControlNets).
RELEASED = "_dcaccel_released"


class Family:
    name: str                    # recorded in manifests
    denoiser_attr: str           # the pipeline attribute the step loop stands in for ("unet", "transformer")
    pipelines: tuple[str, ...]   # diffusers pipeline class names
    cut_fields: tuple[str, ...]  # the DeepCacheConfig/BuildConfig fields that say where the model is cut
    default_interval: int = 3    # DeepCacheConfig(interval=None) on this family

    def resolve_config(self, config: DeepCacheConfig) -> DeepCacheConfig:
        """`config` with the family's default interval filled in (the cut is resolve_cut's)."""
        if config.interval is not None:
            return config
        import dataclasses

        return dataclasses.replace(config, interval=self.default_interval)

    def matches(self, denoiser) -> bool:
        raise NotImplementedError

    def denoiser(self, pipe):
        """The model the graphs are cut from: the pipeline's denoiser (a family may join more models to it)."""
        return getattr(pipe, self.denoiser_attr)

    def attach_extras(self, pipe, wrapper):
        """Whatever else the pipeline must do while DeepCache is enabled; returns the function that undoes it."""
        return lambda: None

    def check(self, denoiser) -> None:
        """Raise a clear error if `denoiser` is a configuration this family does not split exactly."""
        raise NotImplementedError

    def resolve_cut(self, denoiser, config: DeepCacheConfig | BuildConfig) -> dict:
        """The cut `config` asks for, with the family's defaults filled in and checked against `denoiser`."""
        raise NotImplementedError

    def split(self, denoiser, cut: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(full, shallow): plain nn.Modules sharing the denoiser's weights."""
        raise NotImplementedError

    def geometry(self, pipe) -> dict:
        """What turns an image size and batch into graph shapes (VAE factor, text length, ...)."""
        raise NotImplementedError

    def graph_specs(self, denoiser, cut: dict, build: BuildConfig, geometry: dict) -> dict[str, GraphSpec]:
        raise NotImplementedError

    def graph_settings(self, denoiser) -> dict:
        """Settings of the denoiser, other than its weights, that its graphs compute with (the U-Net's FreeU
        factors): a change after enable makes the graphs be cut again, or is refused where they cannot be."""
        return {}

    def inputs_changed(self, old: dict, new: dict) -> str | None:
        """Why a change of graph settings (old -> new) changes the graphs' inputs, which a running step loop cannot
        follow (say IP-Adapters loaded after enable), or None."""
        return None

    def probe(self, denoiser, cut: dict):
        """A small module on the denoiser's weights whose output tells how much a step changed (for
        schedule='dynamic'), with `input_names`; None where the family has none."""
        return None

    def check_call(self, kwargs: dict, runner=None) -> None:
        """Refuse, before anything runs, pipeline call arguments the graphs cannot honour."""

    def call_inputs(self, denoiser, args: tuple, kwargs: dict, wrapper=None) -> dict[str, torch.Tensor]:
        """The graph inputs of one denoiser call as the pipeline makes it; raises for arguments the graphs cannot
        honour. `wrapper` is the step loop (for what other calls of the step handed over)."""
        raise NotImplementedError

    def output(self, noise: torch.Tensor, return_dict: bool):
        """What the denoiser would have returned."""
        raise NotImplementedError

    def config_dict(self, denoiser) -> dict:
        """The architecture config as it determines the graphs: no private `_` keys (diffusers' bookkeeping,
        paths), JSON values (tuples as lists)."""
        return normalized_config(dict(denoiser.config))

    def cut_text(self, cut: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in cut.items())


def normalized_config(config: dict) -> dict:
    clean = {k: v for k, v in config.items() if not str(k).startswith("_")}
    return json.loads(json.dumps(clean, sort_keys=True, default=_jsonable))


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def timestep_input(timestep, batch: int, device) -> torch.Tensor:
    """Timesteps as float32 of shape (batch,), made the same way on every call so that a compiled graph never sees
    a new kind of tensor."""
    t = torch.as_tensor(timestep, device=device).to(torch.float32).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t
