"""What every backend provides, and what their runners share.

A backend module has:
    NAME, Options (a BackendOptions dataclass), VERSIONS (packages whose version must match between build and
    load), TOLERANCE {dtype: (atol, rtol)} and STRICT (whether a build beyond it fails or only warns),
    FILES_REQUIRED (whether it can run only from built files),
    build(graphs, specs, directory, options) -> (graph files, runner or None)
    load(graphs, specs, options, directory=None, graph_files=None) -> Runner
It imports nothing above dcaccel.graphs: the engine layer (dcaccel.engines) keys, writes, reads and verifies what
a backend builds.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Protocol

import torch

from ..errors import MissingDependencyError, require  # noqa: F401 (re-exported for the backends)


class Runner(Protocol):
    """Runs the full and the shallow graph. The full graph writes the cached tensors into `cache` (one buffer each
    for the life of the runner); the shallow graph reads them. Inputs are keyed by the GraphSpec input names."""

    cache: dict[str, torch.Tensor]
    static_shapes: dict[str, tuple[int, ...]] | None  # None: any shape; else the only shapes accepted
    loras: list[dict]

    def run_full(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def run_shallow(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def refit(self, graphs: dict[str, torch.nn.Module]) -> float:
        """Take the weights of `graphs` (the same architecture, cut the same way); returns the seconds it took."""

    def close(self) -> None: ...


def option(default, doc: str, build: bool = False, choices: tuple | None = None, kind: type | tuple | None = None,
           minimum: float | None = None):
    """A backend option. build=True: it changes what is built (part of the engine key, fixed by an engine
    directory); otherwise it only changes how a built engine is run."""
    from dataclasses import field

    kind = kind or type(default)
    return field(default=default, metadata={"doc": doc, "build": build, "choices": choices, "kind": kind,
                                            "minimum": minimum})


@dataclass(frozen=True)
class BackendOptions:
    """Typed options of one backend; an unknown key is an error that lists the allowed ones."""

    backend = "backend"

    def __post_init__(self):
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None and f.default is None:
                continue
            kind = meta.get("kind")
            ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                ok = True
            if not ok:
                raise ValueError(f"{self.backend} option {f.name} must be {_kind_text(kind)}, got {value!r}")
            if meta.get("choices") and value not in meta["choices"]:
                raise ValueError(f"{self.backend} option {f.name} must be one of {list(meta['choices'])}, got {value!r}")
            if meta.get("minimum") is not None and value < meta["minimum"]:
                raise ValueError(f"{self.backend} option {f.name} must be >= {meta['minimum']}, got {value!r}")

    @classmethod
    def allowed(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def describe(cls) -> str:
        parts = []
        for f in fields(cls):
            default = None if f.default is MISSING else f.default
            parts.append(f"{f.name} ({'build' if f.metadata['build'] else 'load'}, default {default!r}): "
                         f"{f.metadata['doc']}")
        return "; ".join(parts) or "none"

    @classmethod
    def parse(cls, options: dict | None) -> "BackendOptions":
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.allowed()))
        if unknown:
            raise ValueError(f"unknown {cls.backend} options {unknown}; allowed: {cls.allowed() or 'none'}"
                             + (f" ({cls.describe()})" if cls.allowed() else ""))
        return cls(**options)

    def build_options(self) -> dict:
        """The options that change what is built: part of the engine key and the manifest."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["build"]}

    def load_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata["build"]}

    @classmethod
    def build_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata["build"]]


def _kind_text(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


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
            + (" The ControlNet inputs differ: with guidance, guess mode (guess_mode=True, or a ControlNet with "
               "global_pool_conditions, which diffusers runs in guess mode) gives the ControlNets half the batch; "
               "such calls need an engine built with BuildConfig(guess_mode=True)."
               if any(d.startswith("control_") for d in diffs) else "")
        )


def device_of(graphs: dict[str, torch.nn.Module]) -> torch.device:
    p = next(graphs["full"].parameters(), None)
    return p.device if p is not None else torch.device("cpu")
