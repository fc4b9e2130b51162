"""ONNX Runtime: both graphs exported to ONNX, run with IO binding on buffers allocated and bound once.

The full graph writes the feature straight into the buffer the shallow graph reads (no host round trip).
Providers: CPUExecutionProvider (verified here), CUDAExecutionProvider and TensorrtExecutionProvider (GPU only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..buffers import allocate
from ..config import BuildConfig
from .base import check_static_shapes, require

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}
TOLERANCE = {"float32": (2e-3, 2e-3), "float16": (5e-2, 5e-2)}  # (atol, rtol) a build must reach


def build(unet, specs, directory: Path, build: BuildConfig, progress: bool = False) -> dict:
    """Export both graphs to ONNX in `directory` and check each against PyTorch."""
    from ..onnx_export import check_onnx, export_onnx
    from ..split import split_unet

    if build.dtype not in TOLERANCE:
        raise ValueError(f"onnxruntime builds take dtype float32 or float16, got {build.dtype!r}")
    exporter = build.options.get("exporter", "torchscript")
    graphs = dict(zip(("full", "shallow"), split_unet(unet, build.branch)))
    atol, rtol = TOLERANCE[build.dtype]
    out = {}
    for name in _progress(("full", "shallow"), progress, "export + check"):
        files = export_onnx(graphs[name], specs[name], Path(directory) / f"{name}.onnx", exporter=exporter)
        tol = check_onnx(graphs[name], specs[name], Path(directory) / f"{name}.onnx", atol, rtol)
        out[name] = {"files": {"onnx": files[0]}, "all_files": files, "tolerance": tol, "exporter": exporter}
    return out


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc)


def session_options(threads: int | None = None):
    ort = require("onnxruntime", "onnxruntime", "onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    # Spinning worker threads between steps starve PyTorch's own threads (scheduler, VAE, guidance).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class OrtRunner:
    """Both sessions with one set of buffers: inputs are copied into bound buffers, the full graph's `feature`
    output and the shallow graph's `feature` input are the same tensor."""

    def __init__(self, onnx_paths: dict[str, Path], specs, provider: str = "cpu", threads: int | None = None):
        ort = require("onnxruntime", "onnxruntime", "onnx")
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; choose from {sorted(PROVIDERS)}")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise RuntimeError(f"ONNX Runtime provider {PROVIDERS[provider]} is not available here (available: "
                               f"{available}); for CUDA/TensorRT install onnxruntime-gpu on a CUDA machine")
        device = torch.device("cpu" if provider == "cpu" else "cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"provider {provider!r} needs CUDA, and torch sees no CUDA device")
        so = session_options(threads)
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        self.sessions = {}
        for name, path in onnx_paths.items():
            try:
                self.sessions[name] = ort.InferenceSession(str(path), so, providers=providers)
            except Exception as e:  # ORT raises its own exception types for bad files
                raise RuntimeError(f"ONNX Runtime cannot load {path} ({type(e).__name__}: {e}); rebuild the engine") from e
        self.specs = specs
        shapes, dtypes = {}, {}
        for spec in specs.values():
            shapes.update(spec.shapes())
            dtypes.update(spec.dtypes())
        self.buffers = allocate(shapes, dtypes, device)
        self.static_shapes = {t.name: t.shape for s in specs.values() for t in s.inputs if t.name != "feature"}
        self.bindings = {name: self._bind(name, device) for name in self.sessions}

    def _bind(self, name, device):
        binding = self.sessions[name].io_binding()
        spec = self.specs[name]
        for t, bind in [(t, binding.bind_input) for t in spec.inputs] + [(t, binding.bind_output) for t in spec.outputs]:
            buf = self.buffers[t.name]
            bind(t.name, device.type, device.index or 0, NP_DTYPES[buf.dtype], tuple(buf.shape), buf.data_ptr())
        return binding

    @property
    def feature(self) -> torch.Tensor:
        return self.buffers["feature"]

    def _run(self, name, inputs):
        check_static_shapes(self.static_shapes, inputs, "this onnxruntime engine")
        for t in self.specs[name].inputs:
            if t.name != "feature":
                self.buffers[t.name].copy_(inputs[t.name])
        if self.buffers["noise"].is_cuda:
            torch.cuda.current_stream().synchronize()
        self.sessions[name].run_with_iobinding(self.bindings[name])
        # A copy: the pipeline (a PNDM scheduler, say) may keep the output across steps.
        return self.buffers["noise"].clone().to(inputs["sample"].dtype)

    def run_full(self, inputs):
        return self._run("full", inputs)

    def run_shallow(self, inputs):
        return self._run("shallow", inputs)


def create_runner(unet, branch: int, pipe=None, engine_dir=None, provider: str = "cpu", threads: int | None = None,
                  **build_options):
    """Load built engines from `engine_dir`, or (without one) export to a temporary directory for this process:
    then height/width/batch_size are required, as for a build."""
    from ..build import open_engine_dir

    if engine_dir is None:
        engine_dir = _build_in_memory(pipe, branch, "onnxruntime", **build_options)
    elif build_options:
        raise ValueError(f"options {sorted(build_options)} are fixed by the engine in {engine_dir}")
    manifest, specs = open_engine_dir(engine_dir, unet, branch, "onnxruntime")
    paths = {name: Path(engine_dir) / manifest.graph_file(name, "onnx") for name in ("full", "shallow")}
    return OrtRunner(paths, specs, provider=provider, threads=threads)


def _build_in_memory(pipe, branch, backend, height=None, width=None, batch_size=1, cfg=True, dtype="float32",
                     **options):
    """Build into a per-process temporary directory (for enable() without an engine_dir)."""
    import tempfile

    from ..build import build_engines

    if pipe is None or height is None or width is None:
        raise ValueError(f"backend {backend!r} needs engine_dir=..., or height=, width= (and batch_size=, cfg=) "
                         "to build its static-shape graphs now")
    out = tempfile.mkdtemp(prefix="dcaccel-engines-")
    build = BuildConfig(height=height, width=width, batch_size=batch_size, cfg=cfg, dtype=dtype, branch=branch,
                        backend=backend, options=options)
    directory, _ = build_engines(pipe, build, out_dir=out, model_name="in-memory")
    return directory
