"""ONNX Runtime: both graphs exported to ONNX, run with IO binding on buffers allocated and bound once.

The full graph writes the feature straight into the buffer the shallow graph reads (no host round trip).
Providers: CPUExecutionProvider (verified here), CUDAExecutionProvider and TensorrtExecutionProvider (GPU only).

New weights (a LoRA swap) without a new export: a build writes beside each graph a weight map, <graph>.weights.json,
saying which U-Net parameters each ONNX initializer holds; a refit opens new sessions on the same graphs with every
mapped initializer's data taken from the parameters' current values (see OrtRunner.refit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..buffers import allocate_graph_buffers
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
        wmap = weight_map(Path(directory) / f"{name}.onnx", graphs[name], unet)
        (Path(directory) / f"{name}.weights.json").write_text(json.dumps(wmap, indent=0, sort_keys=True))
        out[name] = {"files": {"onnx": files[0], "weights": f"{name}.weights.json"},
                     "all_files": [*files, f"{name}.weights.json"], "tolerance": tol, "exporter": exporter,
                     "refittable": not wmap["unmatched"]}
    return out


# -- weight maps: which parameters each initializer holds ------------------------------------------------------

WEIGHT_MAP_FORMAT = 1


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data).hexdigest()


def weight_map(onnx_path: Path, graph: torch.nn.Module, unet) -> dict:
    """Map each initializer of an exported graph to the U-Net parameters it holds, by value.

    The torchscript exporter keeps a parameter's name when it uses the tensor as it is, but constant folding
    stores Linear weights transposed for MatMul (as onnx::MatMul_N) and GroupNorm affine parameters reshaped
    (onnx::Mul_N / onnx::Add_N), and it stores parameters with equal values once (all the norm weights that are
    still ones). So names are not enough: an initializer maps to every parameter whose values, as they are,
    reshaped or transposed, are exactly its bytes. Returns

      initializers:    {name: {shape, dtype, params: [[parameter, "reshape" | "transpose"], ...]}}
      unmapped_params: {parameter: digest} used by the graph but held by no initializer as such; a refit
                       refuses if any of them changed
      unmatched:       float initializers of more than one value that hold no parameter (constants derived
                       from weights some other way): if there are any, the engine cannot be refitted
    """
    onnx = require("onnx", "onnxruntime", "onnx")
    from onnx import numpy_helper

    names = {id(p): n for n, p in unet.named_parameters(remove_duplicate=False)}
    params = {names[id(p)]: p.detach().to("cpu") for p in graph.parameters()}
    model = onnx.load(str(onnx_path), load_external_data=True)
    inits = [(i.name, numpy_helper.to_array(i)) for i in model.graph.initializer]
    table: dict[tuple[str, str], list] = {}
    for dtype in {a.dtype for _, a in inits if a.dtype.kind == "f"}:
        torch_dtype = torch.from_numpy(np.zeros(0, dtype)).dtype
        for name, t in params.items():
            a = t.to(torch_dtype).numpy()
            table.setdefault((dtype.str, _digest(a)), []).append([name, "reshape"])
            if a.ndim == 2:
                table.setdefault((dtype.str, _digest(a.T)), []).append([name, "transpose"])
    mapped, used, unmatched = {}, set(), []
    for name, a in inits:
        candidates = table.get((a.dtype.str, _digest(a)), []) if a.dtype.kind == "f" else []
        if candidates:
            mapped[name] = {"shape": list(a.shape), "dtype": a.dtype.name, "params": candidates}
            used.update(c[0] for c in candidates)
        elif a.dtype.kind == "f" and a.size > 1:
            unmatched.append(name)
    unmapped = {n: _digest(t.numpy()) for n, t in params.items() if n not in used}
    if unmatched:
        logger.warning("%s: initializers %s hold no parameter as such; this engine cannot be refitted",
                       Path(onnx_path).name, unmatched[:5])
    return {"format": WEIGHT_MAP_FORMAT, "initializers": mapped, "unmapped_params": unmapped, "unmatched": unmatched}


def initializer_values(unet, wmap: dict, what: str = "graph") -> dict[str, torch.Tensor]:
    """The values each mapped initializer must hold for `unet`'s current weights (CPU tensors in the
    initializer's shape and dtype; views of the parameters where possible)."""
    from ..manifest import EngineError

    if wmap.get("format") != WEIGHT_MAP_FORMAT:
        raise EngineError(f"{what}: weight map format {wmap.get('format')!r}, this dcaccel reads "
                          f"{WEIGHT_MAP_FORMAT}; rebuild the engine")
    if wmap["unmatched"]:
        raise EngineError(f"{what}: the exported graph holds weights in initializers that are no plain copy of a "
                          f"parameter ({', '.join(wmap['unmatched'][:5])}); it cannot be refitted, rebuild it")
    params = dict(unet.named_parameters(remove_duplicate=False))
    missing = sorted({p for info in wmap["initializers"].values() for p, _ in info["params"]} - set(params)
                     | set(wmap["unmapped_params"]) - set(params))
    if missing:
        raise EngineError(f"{what}: the U-Net has no parameters {missing[:5]}; the engine is for another model")
    changed = [n for n, digest in wmap["unmapped_params"].items()
               if _digest(params[n].detach().to("cpu").numpy()) != digest]
    if changed:
        raise EngineError(f"{what}: parameters {changed[:5]} changed, and the exported graph holds them in no "
                          "initializer a refit can replace; rebuild the engine")
    values = {}
    with torch.no_grad():
        for name, info in wmap["initializers"].items():
            dtype = torch.from_numpy(np.zeros(0, info["dtype"])).dtype
            shape = tuple(info["shape"])
            got = []
            for pname, how in info["params"]:
                t = params[pname].detach()
                t = t.T if how == "transpose" else t
                got.append(t.to("cpu", dtype).reshape(shape))
            if any(not torch.equal(got[0], t) for t in got[1:]):
                raise EngineError(
                    f"{what}: initializer {name} holds parameters {[p for p, _ in info['params']][:5]}, equal when "
                    "exported (the exporter stored them once), that now differ; rebuild the engine")
            values[name] = got[0]
    return values


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

    def __init__(self, onnx_paths: dict[str, Path], specs, provider: str = "cpu", threads: int | None = None,
                 weight_maps: dict[str, Path] | None = None):
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
        self.buffers, self.static_shapes = allocate_graph_buffers(specs, device)
        self.bindings = {name: self._bind(name, device) for name in self.sessions}
        self.onnx_paths, self.weight_maps = dict(onnx_paths), dict(weight_maps or {})
        self._session_args = (threads, providers)
        self.loras: list[dict] = []  # the fused LoRAs (from the manifest; dcaccel.lora records swaps here)

    def refit(self, unet) -> float:
        """Give both graphs `unet`'s current weights without exporting again. Returns the seconds it took.

        For each graph the ONNX file is read without its weights; every initializer its weight map ties to
        parameters gets their current values (transposed or reshaped as the export stored them) in one in-memory
        external data file, and a new session is made from that. The structure is the exported one, so ONNX
        Runtime optimizes it as it did at the first load: the result is that of a fresh build with these weights.
        (SessionOptions.add_initializer would be simpler, but ONNX Runtime 1.32's NCHWc layout pass reads the
        file's conv weights and ignores such overrides.) The old sessions serve until both new ones exist.
        """
        from ..manifest import EngineError

        ort = require("onnxruntime", "onnxruntime", "onnx")
        start = time.perf_counter()
        threads, providers = self._session_args
        sessions, replaced = {}, 0
        for name, path in self.onnx_paths.items():
            if name not in self.weight_maps:
                raise EngineError(f"the {name} graph at {path} has no weight map (built before dcaccel could refit); "
                                  "rebuild the engine")
            wmap = json.loads(Path(self.weight_maps[name]).read_text())
            values = initializer_values(unet, wmap, what=f"{name} graph ({path})")
            model, data = _refit_model(path, values)
            so = session_options(threads)
            so.add_external_initializers_from_files_in_memory([REFIT_DATA], [data], [data.nbytes])
            try:
                sessions[name] = ort.InferenceSession(model, so, providers=providers)
            except Exception as e:  # ORT raises its own exception types
                raise RuntimeError(f"ONNX Runtime cannot refit {path} ({type(e).__name__}: {e})") from e
            replaced += len(values)
            del model, data, values
        self.sessions = sessions
        self.bindings = {name: self._bind(name, self.buffers["noise"].device) for name in self.sessions}
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
    from ..lora import current_loras

    if engine_dir is None:
        engine_dir = _build_in_memory(pipe, branch, "onnxruntime", **build_options)
    elif build_options:
        raise ValueError(f"options {sorted(build_options)} are fixed by the engine in {engine_dir}")
    loras = current_loras(pipe) if pipe is not None else None
    manifest, specs = open_engine_dir(engine_dir, unet, branch, "onnxruntime", loras=loras)
    graphs = manifest.data["graphs"]
    paths = {name: Path(engine_dir) / manifest.graph_file(name, "onnx") for name in ("full", "shallow")}
    maps = {name: Path(engine_dir) / graphs[name]["files"]["weights"] for name in paths
            if graphs[name]["files"].get("weights")}
    runner = OrtRunner(paths, specs, provider=provider, threads=threads, weight_maps=maps)
    runner.loras = manifest.data.get("loras", [])
    return runner


def _build_in_memory(pipe, branch, backend, height=None, width=None, batch_size=1, cfg=True, dtype="float32",
                     **options):
    """Build into a per-process temporary directory (for enable() without an engine_dir)."""
    import tempfile

    from ..build import build_engines
    from ..lora import current_loras

    if pipe is None or height is None or width is None:
        raise ValueError(f"backend {backend!r} needs engine_dir=..., or height=, width= (and batch_size=, cfg=) "
                         "to build its static-shape graphs now")
    out = tempfile.mkdtemp(prefix="dcaccel-engines-")
    build = BuildConfig(height=height, width=width, batch_size=batch_size, cfg=cfg, dtype=dtype, branch=branch,
                        backend=backend, options=options)
    directory, _ = build_engines(pipe, build, out_dir=out, model_name="in-memory", loras=current_loras(pipe))
    return directory
