"""What an engine directory holds, its key, and the compatibility check on load.

engines/<model>/<key>/manifest.json records the settings that force a rebuild (ENGINE_INVARIANT), the
weights' hash, the model config, the graph specs, the files with their sizes and hashes, library versions,
the tolerances the build reached, and the build time. A directory is written under a temporary name and renamed
when complete, so an interrupted build never leaves a directory that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# BuildConfig fields that change what is built: any difference means another engine.
ENGINE_INVARIANT = ("height", "width", "batch_size", "cfg", "dtype", "branch", "backend", "fp16", "refittable",
                    "options")


class EngineError(RuntimeError):
    """An engine directory that cannot be used: missing, truncated, or built for something else."""


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer, in state_dict order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def engine_key(build_settings: dict, weights: str, loras: list | None = None) -> str:
    """Hash of exactly the engine-invariant settings, the weights' hash and the fused LoRAs."""
    payload = {"format": FORMAT_VERSION, "weights": weights, "loras": loras or [],
               **{k: build_settings[k] for k in ENGINE_INVARIANT}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def library_versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("dcaccel", "torch", "diffusers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "polygraphy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Manifest:
    data: dict

    @property
    def key(self) -> str:
        return self.data["key"]

    @property
    def build(self) -> dict:
        return self.data["build"]

    def graph_file(self, graph: str, kind: str) -> str:
        return self.data["graphs"][graph]["files"][kind]

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise EngineError(f"{directory} is not an engine directory: {MANIFEST} is missing (build it with "
                              "build_scripts/build.py or `dcaccel build`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EngineError(f"{path} is not valid JSON ({e}); rebuild with --force") from e
        if data.get("format") != FORMAT_VERSION:
            raise EngineError(f"{path} has format {data.get('format')!r}, this dcaccel reads format {FORMAT_VERSION}; "
                              "rebuild with --force")
        return cls(data)

    def verify_files(self, directory: Path, hash_files: bool = False) -> None:
        """Every listed file exists with its recorded size (and hash, if asked): a clear error, not a crash
        deep inside a runtime."""
        for graph, info in self.data["graphs"].items():
            for rel, meta in info["checksums"].items():
                p = Path(directory) / rel
                if not p.is_file():
                    raise EngineError(f"engine file {p} ({graph} graph) is missing; rebuild with --force")
                if p.stat().st_size != meta["size"]:
                    raise EngineError(f"engine file {p} ({graph} graph) has {p.stat().st_size} bytes, the manifest "
                                      f"records {meta['size']}: truncated or replaced; rebuild with --force")
                if hash_files and file_sha256(p) != meta["sha256"]:
                    raise EngineError(f"engine file {p} ({graph} graph) does not match its recorded sha256; "
                                      "rebuild with --force")

    def check_compatible(self, expected: dict) -> None:
        """Refuse the engine if any expected field differs; name each one."""
        diffs = []
        for field, want in expected.items():
            have = _get(self.data, field)
            if have != want:
                diffs.append(f"{field}: engine has {_short(have)}, pipeline needs {_short(want)}")
        if diffs:
            raise EngineError("engine was built for something else and is refused:\n  " + "\n  ".join(diffs) +
                              "\nrebuild it for this pipeline (build_scripts/build.py ... --force)")


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


class StagingDir:
    """Write a directory under a temporary name beside its target; rename into place only on success."""

    def __init__(self, target: Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
        return False


def write_manifest(directory: Path, data: dict) -> None:
    data = {"format": FORMAT_VERSION, **data}
    for graph, info in data["graphs"].items():
        info["checksums"] = {
            rel: {"size": (Path(directory) / rel).stat().st_size, "sha256": file_sha256(Path(directory) / rel)}
            for rel in info["all_files"]
        }
    (Path(directory) / MANIFEST).write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
