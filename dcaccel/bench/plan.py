"""What one benchmark run measures: the configurations, in the order they are measured."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..config import DeepCacheConfig

# The peers a family's DeepCache rows are compared with, in the same run and with the same settings.
PEERS = {"unet": ("deepcache",), "controlnet": ("deepcache",), "mmdit": ("cache-dit", "cache-dit+compile")}
PEER_LABELS = {"deepcache": "reference DeepCacheSDHelper", "cache-dit": "cache-dit DBCache (static mask)",
               "cache-dit+compile": "cache-dit DBCache (static mask) + torch.compile"}
PEER_PACKAGES = {"deepcache": ("DeepCache", "pip install DeepCache==0.1.1"),
                 "cache-dit": ("cache_dit", "pip install cache-dit==1.5.3"),
                 "cache-dit+compile": ("cache_dit", "pip install cache-dit==1.5.3")}


def cut_text(config: DeepCacheConfig) -> str:
    if config.head_blocks is not None or config.tail_blocks is not None:
        return f"head {config.head_blocks}, tail {config.tail_blocks}"
    return f"branch {config.branch}" + ("" if config.cut_controlnet else ", whole ControlNet")


@dataclass(frozen=True)
class Case:
    """One configuration: plain diffusers ("baseline"), dcaccel on a backend, or a peer ("reference")."""

    kind: str                            # "baseline" | "dcaccel" | "reference"
    backend: str                         # "diffusers" for the baseline, "eager" for a peer without compile
    config: DeepCacheConfig | None = None
    peer: str | None = None              # a key of PEER_LABELS for kind "reference"
    not_run: str | None = None           # why it will not run, decided while planning

    @property
    def cache(self) -> str:
        c = self.config
        if c is None or self.kind == "baseline":
            return "-"
        return "no cache" if c.interval == 1 else f"interval {c.interval}, {cut_text(c)}, {c.schedule}"

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return "diffusers (no dcaccel)"
        name = PEER_LABELS[self.peer] if self.kind == "reference" else self.backend
        return name if self.config is None else f"{name}: {self.cache}"

    @property
    def is_no_cache(self) -> bool:
        return self.kind == "dcaccel" and self.config is not None and self.config.interval == 1


def tensorrt_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "not run: TensorRT needs a CUDA GPU and torch sees none"
    if importlib.util.find_spec("tensorrt") is None:
        return "not run: the tensorrt package is not installed (pip install 'dcaccel[gpu]')"
    return None


def plan(backends, settings: list[DeepCacheConfig], no_cache: DeepCacheConfig, family: str,
         reference: bool, peers: list[str] | None = None) -> list[Case]:
    """Baseline; eager's no-cache run (always: every speedup is against it); per backend its no-cache run then
    each setting; the family's peers per setting right after eager's rows."""
    cases = [Case("baseline", "diffusers")]
    order = ["eager"] + [b for b in backends if b != "eager"]
    for backend in order:
        if backend == "tensorrt" and (reason := tensorrt_unavailable()):
            cases.append(Case("dcaccel", backend, not_run=reason))
            continue
        cases.append(Case("dcaccel", backend, no_cache))
        if backend not in backends:
            continue  # eager's no-cache run only, as the point of comparison
        cases += [Case("dcaccel", backend, c) for c in settings]
        if backend == "eager" and reference:
            for peer in (p for p in PEERS[family] if peers is None or p in peers):
                module, install = PEER_PACKAGES[peer]
                for c in settings:
                    why = None
                    if importlib.util.find_spec(module) is None:
                        why = f"not run: the {module} package is not installed ({install})"
                    elif c.schedule != "uniform":
                        why = "not run: the peer is compared on the uniform schedule only"
                    elif peer.startswith("cache-dit") and c.head_blocks == 0:
                        why = "not run: cache-dit needs head_blocks >= 1 (Fn_compute_blocks)"
                    elif not c.cut_controlnet:
                        continue  # the peer runs the whole ControlNet anyway: one row per setting
                    cases.append(Case("reference", "torch_compile" if peer.endswith("compile") else "eager", c,
                                      peer=peer, not_run=why))
    return cases
