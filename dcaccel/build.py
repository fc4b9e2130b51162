"""Offline builds: BuildConfig -> specs -> backend artifacts -> manifest, in engines/<model>/<key>/.

A build whose key matches an existing complete directory is skipped unless forced; a build is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from .backends import get_backend
from .config import BuildConfig
from .manifest import (EngineError, Manifest, StagingDir, engine_key, library_versions, weights_hash,
                       write_manifest)
from .spec import GraphSpec, TensorSpec, graph_specs
from .split import check_unet

logger = logging.getLogger(__name__)

ENGINE_BACKENDS = ("onnxruntime", "tensorrt", "torch_compile")


def model_config_dict(unet) -> dict:
    return json.loads(json.dumps(dict(unet.config), default=str))


def pipeline_geometry(pipe) -> tuple[int, int]:
    """(VAE scale factor, text length) of a pipeline: what turns an image size into graph shapes."""
    return int(pipe.vae_scale_factor), int(pipe.tokenizer.model_max_length)


def build_engines(pipe, build: BuildConfig, out_dir: str | Path = "engines", model_name: str = "model",
                  force: bool = False, loras: list | None = None, progress: bool = False) -> tuple[Path, bool]:
    """Build the full and shallow graphs of `pipe`'s U-Net for `build`. Returns (directory, built) where built
    is False when a complete build with the same key was found and reused."""
    if build.backend not in ENGINE_BACKENDS:
        raise ValueError(f"backend {build.backend!r} builds nothing; engine backends are {list(ENGINE_BACKENDS)}")
    unet = pipe.unet
    check_unet(unet)
    vae_scale, text_len = pipeline_geometry(pipe)
    specs = graph_specs(unet, build, vae_scale, text_len)
    settings = build.to_dict()
    whash = weights_hash(unet)
    key = engine_key(settings, whash, loras)
    target = Path(out_dir) / model_name / key
    if not force and (target / "manifest.json").is_file():
        try:
            Manifest.read(target).verify_files(target)
            logger.info("found a complete build with key %s at %s: skipped (use force to rebuild)", key, target)
            return target, False
        except EngineError as e:
            logger.warning("existing build at %s is unusable (%s): rebuilding", target, e)
    backend = get_backend(build.backend)
    start = time.perf_counter()
    with StagingDir(target) as tmp:
        graphs = backend.build(unet, specs, tmp, build, progress=progress)
        seconds = time.perf_counter() - start
        write_manifest(tmp, {
            "key": key,
            "model": model_name,
            "weights_hash": whash,
            "loras": loras or [],
            "model_config": model_config_dict(unet),
            "build": settings,
            "geometry": {"vae_scale_factor": vae_scale, "text_len": text_len},
            "specs": {name: spec.to_dict() for name, spec in specs.items()},
            "graphs": graphs,
            "versions": library_versions(),
            "build_seconds": round(seconds, 2),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    logger.info("built %s engines for %s in %.1f s: %s", build.backend, model_name, seconds, target)
    return target, True


def specs_from_manifest(manifest: Manifest) -> dict[str, GraphSpec]:
    def tensors(items):
        return tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in items)

    return {name: GraphSpec(name, tensors(s["inputs"]), tensors(s["outputs"]))
            for name, s in manifest.data["specs"].items()}


def open_engine_dir(engine_dir: str | Path, unet, branch: int, backend: str, loras: list | None = None,
                    extra_checks: dict | None = None) -> tuple[Manifest, dict[str, GraphSpec]]:
    """Read and check an engine directory for `unet` at `branch`: refuse it, naming each field, if it was built
    for other weights, another model config, branch or backend; check that its files are all there."""
    engine_dir = Path(engine_dir)
    manifest = Manifest.read(engine_dir)
    expected = {
        "build.backend": backend,
        "build.branch": branch,
        "model_config": model_config_dict(unet),
        "weights_hash": weights_hash(unet),
        "loras": loras if loras is not None else manifest.data.get("loras", []),
        **(extra_checks or {}),
    }
    manifest.check_compatible(expected)
    manifest.verify_files(engine_dir)
    return manifest, specs_from_manifest(manifest)
