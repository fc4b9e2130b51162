"""ONNX Runtime: both graphs exported to ONNX, run with IO binding on buffers allocated and bound once.

The full graph writes the cached tensors straight into the buffers the shallow graph reads (no host round trip).
Providers: CPUExecutionProvider (verified here), CUDAExecutionProvider and TensorrtExecutionProvider (GPU only).

New weights (a LoRA swap) without a new export: a build writes beside each graph its weight map
(<graph>.weights.json, see graphs.weights); a refit opens new sessions on the same graphs with every mapped
initializer's data taken from the parameters' current values (see OrtRunner.refit).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EngineError
from ..graphs.buffers import allocate_graph_buffers
from ..graphs.onnx import EXPORTERS, export_onnx
from ..graphs.spec import GRAPHS
from ..graphs.weights import initializer_values, read_weight_map, refittable, weight_map
from .base import BackendOptions, check_static_shapes, option, require

logger = logging.getLogger(__name__)

NAME = "onnxruntime"
VERSIONS = ()  # an ONNX file runs on any ONNX Runtime that knows its opset; a load error says so
TOLERANCE = {"float32": (2e-3, 2e-3), "float16": (5e-2, 5e-2)}  # (atol, rtol) a build must reach
STRICT = True
FILES_REQUIRED = True
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


@dataclass(frozen=True)
class Options(BackendOptions):
    backend = NAME
    exporter: str = option("torchscript", "ONNX exporter (dynamo is newer, slower to export)", build=True,
                           choices=EXPORTERS)
    opset: int = option(17, "ONNX opset of the export (dynamo uses at least 18)", build=True, minimum=14)
    provider: str = option("cpu", "execution provider: cpu, cuda or tensorrt (the latter two need "
                                  "onnxruntime-gpu and CUDA)", choices=tuple(PROVIDERS))
    threads: int | None = option(None, "intra-op threads (default: ONNX Runtime's)", kind=int, minimum=1)


def check_available(options: Options, dtype: str) -> None:
    """Fail before any export if this machine cannot run the engines."""
    ort = require("onnxruntime", NAME, "onnx")
    require("onnx", NAME, "onnx")
    if dtype not in TOLERANCE:
        raise ValueError(f"onnxruntime builds take dtype float32 or float16, got {dtype!r}")
    available = ort.get_available_providers()
    if PROVIDERS[options.provider] not in available:
        raise RuntimeError(f"ONNX Runtime provider {PROVIDERS[options.provider]} is not available here (available: "
                           f"{available}); for CUDA/TensorRT install onnxruntime-gpu on a CUDA machine")
    if options.provider != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(f"provider {options.provider!r} needs CUDA, and torch sees no CUDA device")


def build(graphs, specs, directory: Path, options: Options):
    """Export both graphs to ONNX in `directory`, each with its weight map."""
    directory = Path(directory)
    out = {}
    for name in GRAPHS:
        path = directory / f"{name}.onnx"
        files = export_onnx(graphs[name], specs[name], path, exporter=options.exporter, opset=options.opset)
        wmap = weight_map(path, graphs[name], specs[name], options.exporter, options.opset)
        if not refittable(wmap):
            logger.warning("%s: initializers %s hold no parameter as such; this engine cannot be refitted",
                           path.name, wmap["unmatched"][:5])
        (directory / f"{name}.weights.json").write_text(json.dumps(wmap, indent=0, sort_keys=True))
        out[name] = {"files": {"onnx": files[0], **({"onnx_data": files[1]} if len(files) > 1 else {}),
                               "weights": f"{name}.weights.json"},
                     "exporter": options.exporter, "refittable": refittable(wmap)}
    return out, None


def load(graphs, specs, options: Options, directory=None, graph_files=None) -> "OrtRunner":
    directory = Path(directory)
    paths = {name: directory / graph_files[name]["onnx"] for name in GRAPHS}
    maps = {name: directory / graph_files[name]["weights"] for name in GRAPHS if graph_files[name].get("weights")}
    return OrtRunner(paths, specs, provider=options.provider, threads=options.threads, weight_maps=maps)


REFIT_DATA = "dcaccel-refit.data"  # the in-memory external data file of a refitted session


def _refit_model(path: Path, values: dict[str, torch.Tensor]) -> tuple[bytes, np.ndarray]:
    """The graph at `path` with every initializer in `values` moved to external data in one in-memory file:
    (model bytes without weights, file contents). Other initializers stay as they are (inline)."""
    onnx = require("onnx", "onnxruntime", "onnx")
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    layout, size = {}, 0
    for name, t in values.items():
        layout[name] = size
        size += -(-t.numel() * t.element_size() // 64) * 64  # 64-byte aligned
    data = np.zeros(size, np.uint8)
    for init in model.graph.initializer:
        t = values.get(init.name)
        if t is None:
            if uses_external_data(init):
                load_external_data_for_tensor(init, str(Path(path).parent))
                init.data_location = onnx.TensorProto.DEFAULT
                del init.external_data[:]
            continue
        offset, nbytes = layout[init.name], t.numel() * t.element_size()
        data[offset:offset + nbytes].view(t.numpy().dtype).reshape(t.shape)[...] = t.numpy()
        for field in ("raw_data", "float_data", "int32_data", "double_data"):
            init.ClearField(field)
        del init.external_data[:]
        init.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", REFIT_DATA), ("offset", str(offset)), ("length", str(nbytes))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    return model.SerializeToString(), data


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
    """Both sessions with one set of buffers: inputs are copied into bound buffers, the full graph's cache outputs
    and the shallow graph's cache inputs are the same tensors."""

    def __init__(self, onnx_paths: dict[str, Path], specs, provider: str = "cpu", threads: int | None = None,
                 weight_maps: dict[str, Path] | None = None):
        ort = require("onnxruntime", NAME, "onnx")
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; choose from {sorted(PROVIDERS)}")
        device = torch.device("cpu" if provider == "cpu" else "cuda")
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        self.specs = specs
        self._session_args = (threads, providers)
        self.sessions = {}
        for name, path in onnx_paths.items():
            try:
                self.sessions[name] = ort.InferenceSession(str(path), session_options(threads), providers=providers)
            except Exception as e:  # ORT raises its own exception types for bad files
                raise EngineError(f"ONNX Runtime cannot load {path} ({type(e).__name__}: {e}); rebuild the engine "
                                  "(--force)") from e
            _check_io(self.sessions[name], specs[name], path)
        self.buffers, self.static_shapes = allocate_graph_buffers(specs, device)
        self.cache = {name: self.buffers[name] for name in specs["full"].cache}
        self.bindings = {name: self._bind(name, device) for name in self.sessions}
        self.onnx_paths, self.weight_maps = dict(onnx_paths), dict(weight_maps or {})
        self.loras: list[dict] = []  # the fused LoRAs (the engine layer and dcaccel.lora record them here)

    @property
    def feature(self) -> torch.Tensor | None:
        return self.cache.get("feature")

    def refit(self, graphs) -> float:
        """Give both graphs the current weights of `graphs` without exporting again. Returns the seconds it took.

        For each graph the ONNX file is read without its weights; every initializer its weight map ties to
        parameters gets their current values (transposed or reshaped as the export stored them) in one in-memory
        external data file, and a new session is made from that. The structure is the exported one, so ONNX
        Runtime optimizes it as it did at the first load: the result is that of a fresh build with these weights.
        (SessionOptions.add_initializer would be simpler, but ONNX Runtime 1.32's NCHWc layout pass reads the
        file's conv weights and ignores such overrides.) The old sessions serve until both new ones exist.
        """
        ort = require("onnxruntime", NAME, "onnx")
        start = time.perf_counter()
        threads, providers = self._session_args
        sessions, replaced = {}, 0
        for name, path in self.onnx_paths.items():
            if name not in self.weight_maps:
                raise EngineError(f"the {name} graph at {path} has no weight map (built before dcaccel could refit); "
                                  "rebuild the engine")
            what = f"{name} graph ({path})"
            values = initializer_values(graphs[name], read_weight_map(self.weight_maps[name], what), what)
            model, data = _refit_model(path, values)
            so = session_options(threads)
            so.add_external_initializers_from_files_in_memory([REFIT_DATA], [data], [data.nbytes])
            try:
                sessions[name] = ort.InferenceSession(model, so, providers=providers)
            except Exception as e:  # ORT raises its own exception types
                raise EngineError(f"ONNX Runtime cannot refit {path} ({type(e).__name__}: {e})") from e
            replaced += len(values)
            del model, data, values
        self.sessions = sessions
        self.bindings = {name: self._bind(name, self.buffers[self.specs["full"].output_names[0]].device)
                         for name in self.sessions}
        seconds = time.perf_counter() - start
        logger.info("onnxruntime refit: %d initializers replaced in %.2f s", replaced, seconds)
        return seconds

    def _bind(self, name, device):
        binding = self.sessions[name].io_binding()
        spec = self.specs[name]
        for t, bind in [(t, binding.bind_input) for t in spec.inputs] + [(t, binding.bind_output) for t in spec.outputs]:
            buf = self.buffers[t.name]
            bind(t.name, device.type, device.index or 0, NP_DTYPES[buf.dtype], tuple(buf.shape), buf.data_ptr())
        return binding

    def _run(self, name, inputs):
        spec = self.specs[name]
        check_static_shapes(self.static_shapes, inputs, "this onnxruntime engine")
        for t in spec.call_inputs:
            self.buffers[t.name].copy_(inputs[t.name])
        noise = self.buffers[spec.output_names[0]]
        if noise.is_cuda:
            torch.cuda.current_stream().synchronize()
        self.sessions[name].run_with_iobinding(self.bindings[name])
        # A copy: the pipeline (a PNDM scheduler, say) may keep the output across steps.
        return noise.clone().to(next(iter(inputs.values())).dtype)

    def run_full(self, inputs):
        return self._run("full", inputs)

    def run_shallow(self, inputs):
        return self._run("shallow", inputs)

    def close(self) -> None:
        self.sessions, self.bindings = {}, {}


def _check_io(session, spec, path) -> None:
    """The session's inputs and outputs are the spec's, by name and shape (a clear error for a graph file that
    belongs elsewhere)."""
    got_in = {i.name: list(i.shape) for i in session.get_inputs()}
    got_out = {o.name: list(o.shape) for o in session.get_outputs()}
    want_in = {t.name: list(t.shape) for t in spec.inputs}
    want_out = {t.name: list(t.shape) for t in spec.outputs}
    if got_in != want_in or got_out != want_out:
        raise EngineError(f"{path} is not the {spec.name} graph of this engine: it takes {got_in} and gives "
                          f"{got_out}, the manifest's spec takes {want_in} and gives {want_out}; rebuild the "
                          "engine (--force)")
