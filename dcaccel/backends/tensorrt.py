"""TensorRT: both graphs built from the onnxruntime backend's ONNX files into static-shape plans, run on buffers
allocated and bound once (the full graph's `feature` output is the shallow graph's `feature` input), optionally
replayed as CUDA graphs, and refittable with a U-Net's new weights (LoRA swaps) without a rebuild.

Written against the TensorRT 10 Python API documentation and NVIDIA's demo/Diffusion engine code, and never run
on the machines this project is developed on: they have no GPU and TensorRT does not install there. Only the
error paths (no CUDA, no tensorrt) and the weight map behind `refit` are tested on CPU; the rest is covered by
GPU tests that skip elsewhere. TensorRT 11 (which torch-tensorrt 2.13 in the `gpu` extra pulls in) removed
BuilderFlag.FP16: there fp16 engines come only from a float16 graph (build dtype="float16").

Refit assumes what the ONNX exporter does to weights: an initializer is either a parameter under its own name, or
a parameter (or several equal ones, which the exporter merges) reshaped or transposed by constant folding, or a
constant that no parameter feeds. The build records that map per graph (`<graph>.refit.json`) by matching values;
refit raises if TensorRT asks for a weight the map does not know, or if parameters that were equal at export (and
so may have been merged) now differ.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..buffers import allocate_graph_buffers
from ..config import BuildConfig
from .base import check_static_shapes, require

logger = logging.getLogger(__name__)

GRAPHS = ("full", "shallow")
TIMING_CACHE = "timing.cache"  # beside the key directories: every build of a model reuses it
# A build whose engine differs more from eager logs a warning (TensorRT allows TF32 in float32 engines by default).
WARN_REL_L2 = {"float32": 1e-2, "float16": 5e-2}
OPTIONS = ("exporter", "workspace_gb")


def _require_trt():
    if not torch.cuda.is_available():
        raise RuntimeError("backend 'tensorrt' needs a CUDA GPU; torch sees none (torch.cuda.is_available() is "
                           "False). Use backend 'onnxruntime' or 'torch_compile' on this machine")
    return require("tensorrt", "tensorrt", "gpu")


@functools.lru_cache(maxsize=None)
def _trt_logger(trt):
    return trt.Logger(trt.Logger.WARNING)  # one for the process: TensorRT warns when builders get different ones


def _torch_dtypes(trt) -> dict:
    return {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64}


def build(unet, specs, directory: Path, build: BuildConfig, progress: bool = False) -> dict:
    """Export both graphs to ONNX, build a plan from each, and compare the engines with eager PyTorch."""
    trt = _require_trt()
    require("onnx", "tensorrt", "onnx")  # plans are built from the onnxruntime backend's ONNX export
    from ..onnx_export import export_onnx
    from ..split import split_unet

    if build.dtype not in WARN_REL_L2:
        raise ValueError(f"tensorrt builds take dtype float32 or float16, got {build.dtype!r}")
    unknown = sorted(set(build.options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown tensorrt options {unknown}; allowed: {list(OPTIONS)}")
    fp16 = build.fp16 or build.dtype == "float16"
    if build.fp16 and build.dtype == "float32" and not hasattr(trt.BuilderFlag, "FP16"):
        raise ValueError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (strong typing only): build with "
                         "dtype='float16' for fp16 kernels")
    directory = Path(directory)
    exporter = build.options.get("exporter", "torchscript")
    workspace = int(build.options.get("workspace_gb", 0) * (1 << 30))
    graphs = dict(zip(GRAPHS, split_unet(unet, build.branch)))
    out = {}
    for name in GRAPHS:
        files = export_onnx(graphs[name], specs[name], directory / f"{name}.onnx", exporter=exporter)
        plan = f"{name}.plan"
        _build_plan(trt, directory / files[0], directory / plan, specs[name], fp16, build.refittable, workspace,
                    directory.parent / TIMING_CACHE)
        out[name] = {"files": {"plan": plan, "onnx": files[0]}, "all_files": files + [plan], "exporter": exporter}
        if build.refittable:
            refit = f"{name}.refit.json"
            (directory / refit).write_text(json.dumps(refit_map(directory / files[0], graphs[name])))
            out[name]["files"]["refit_map"] = refit
            out[name]["all_files"].append(refit)
    runner = TrtRunner({n: directory / f"{n}.plan" for n in GRAPHS}, specs, build.branch)
    for name, reached in _compare(runner, graphs, specs, unet.device).items():
        out[name]["tolerance"] = {"reached": reached, "checked_with": "torch eager on sample inputs"}
        if max(r["rel_l2"] for r in reached.values()) > WARN_REL_L2[build.dtype]:
            logger.warning("TensorRT %s graph differs from eager PyTorch: %s", name, reached)
    return out


def _build_plan(trt, onnx_path, plan_path, spec, fp16, refittable, workspace, cache_path):
    builder = trt.Builder(_trt_logger(trt))
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, _trt_logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t.name for t in inputs if -1 in tuple(t.shape)]
    if dynamic:  # export_onnx writes static shapes; should a graph have none, pin them: min = opt = max
        profile = builder.create_optimization_profile()
        for name in dynamic:
            shape = spec.shapes()[name]
            profile.set_shape(name, shape, shape, shape)
        config.add_optimization_profile(profile)
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16 and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    logger.info("building TensorRT plan %s (fp16=%s, refittable=%s)", plan_path.name, fp16, refittable)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build {plan_path.name} from {onnx_path} (see its log above)")
    with open(plan_path, "wb") as f:
        f.write(plan)
    # the cache is shared by every build of the model: written beside it and renamed, never left half-written
    partial = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.partial")
    partial.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    os.replace(partial, cache_path)


def _compare(runner, graphs, specs, device) -> dict:
    errors = {}
    with torch.no_grad():
        sample = specs["full"].sample_inputs(device=device, seed=1)
        ref_noise, ref_feature = graphs["full"](**sample)
        pairs = {"noise": (ref_noise, runner.run_full(sample)), "feature": (ref_feature, runner.feature)}
        errors["full"] = _errors(pairs)
        sample = {t.name: sample[t.name] for t in specs["shallow"].inputs if t.name != "feature"}
        runner.feature.copy_(ref_feature)
        errors["shallow"] = _errors({"noise": (graphs["shallow"](**sample, feature=ref_feature),
                                               runner.run_shallow(sample))})
    return errors


def _errors(pairs) -> dict:
    out = {}
    for name, (ref, got) in pairs.items():
        ref, got = ref.double(), got.to(ref.device).double()
        out[name] = {"max_abs": float((ref - got).abs().max()),
                     "rel_l2": float((ref - got).norm() / ref.norm().clamp_min(1e-12))}
    return out


def _digest(t: torch.Tensor) -> str:
    return f"{t.dtype}:{t.numel()}:{hashlib.sha1(t.contiguous().numpy()).hexdigest()}"


def refit_map(onnx_path: Path, graph: torch.nn.Module) -> dict:
    """For each ONNX initializer, the state_dict entries of `graph` it was made from, by name or by value:
    {"weights": {initializer: {"shape": [...], "sources": [[key, "reshape" | "transpose"], ...]}},
     "constants": [initializers that no parameter feeds]}."""
    onnx = require("onnx", "onnxruntime", "onnx")
    from onnx import numpy_helper

    state = {k: v.detach().cpu() for k, v in graph.state_dict().items()}
    by_value: dict[str, list] = {}
    for key, t in state.items():
        for how, x in [("reshape", t)] + ([("transpose", t.t())] if t.dim() == 2 else []):
            by_value.setdefault(_digest(x), []).append([key, how])
    model = onnx.load(str(onnx_path))  # export_onnx wraps the graph in PositionalGraph: names start "graph."
    named = {init.name.removeprefix("graph.") for init in model.graph.initializer} & set(state)
    weights, constants = {}, []
    for init in model.graph.initializer:
        value = torch.from_numpy(numpy_helper.to_array(init, base_dir=str(Path(onnx_path).parent)).copy())
        key = init.name.removeprefix("graph.")
        # Every parameter of equal value may have been merged into this initializer: all are listed, and refit
        # refuses to go on if they no longer agree (conservative: equal values are rare in trained weights).
        found = [s for s in by_value.get(_digest(value), []) if s[0] != key]
        sources = ([[key, "reshape"]] if key in named else []) + found
        if sources:
            weights[init.name] = {"shape": list(value.shape), "sources": sources}
        else:
            constants.append(init.name)
    return {"weights": weights, "constants": constants}


class TrtRunner:
    """One execution context per graph, bound once to buffers allocated from the specs."""

    def __init__(self, plan_paths: dict, specs, branch: int, cuda_graph: bool = False, refit_maps=None,
                 onnx_paths=None):
        self.trt = trt = _require_trt()
        self.runtime = trt.Runtime(_trt_logger(trt))  # must outlive its engines
        self.specs, self.branch, self.cuda_graph = specs, branch, cuda_graph
        self.refit_maps, self.onnx_paths = refit_maps, onnx_paths
        device = torch.device("cuda", torch.cuda.current_device())
        self.buffers, self.static_shapes = allocate_graph_buffers(specs, device)
        self.engines, self.contexts, self._graphs = {}, {}, {}
        for name, path in plan_paths.items():
            path = Path(path)
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes()) if path.is_file() else None
            if engine is None:
                raise RuntimeError(f"TensorRT cannot load {path}: missing, truncated, or built by another TensorRT "
                                   "version or GPU; rebuild the engine (--force)")
            self._check_io(name, engine)
            context = engine.create_execution_context()
            for t in specs[name].inputs:
                context.set_input_shape(t.name, t.shape)
            for t in specs[name].inputs + specs[name].outputs:
                context.set_tensor_address(t.name, self.buffers[t.name].data_ptr())
            self.engines[name], self.contexts[name] = engine, context

    def _check_io(self, name, engine):
        trt, spec = self.trt, self.specs[name]
        expected = {t.name: (trt.TensorIOMode.INPUT, t) for t in spec.inputs}
        expected.update({t.name: (trt.TensorIOMode.OUTPUT, t) for t in spec.outputs})
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        diffs = [f"tensors {sorted(names)} != {sorted(expected)}"] if set(names) != set(expected) else []
        for n in set(names) & set(expected):
            mode, t = expected[n]
            shape = tuple(engine.get_tensor_shape(n))
            dtype = _torch_dtypes(trt).get(engine.get_tensor_dtype(n))
            same_shape = len(shape) == len(t.shape) and all(a in (-1, b) for a, b in zip(shape, t.shape))
            if engine.get_tensor_mode(n) != mode or dtype != t.torch_dtype or not same_shape:
                diffs.append(f"{n}: engine {engine.get_tensor_mode(n)} {shape} {dtype}, spec {t.shape} {t.dtype}")
        if diffs:
            raise RuntimeError(f"TensorRT {name} engine does not match its spec ({'; '.join(diffs)}); rebuild it")

    @property
    def feature(self) -> torch.Tensor:
        return self.buffers["feature"]

    def _execute(self, name):
        stream = torch.cuda.current_stream().cuda_stream
        if not self.contexts[name].execute_async_v3(stream):
            raise RuntimeError(f"TensorRT execution of the {name} graph failed (see its log above)")

    def _replay(self, name):
        graph = self._graphs.get(name)
        if graph is not None:
            graph.replay()
            return
        self._execute(name)  # this call's result; the run before capture also flushes TensorRT's deferred setup
        torch.cuda.current_stream().synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # captured on torch's side stream; nothing runs until replay
            self._execute(name)
        self._graphs[name] = graph

    def _run(self, name, inputs):
        check_static_shapes(self.static_shapes, inputs, "this TensorRT engine")
        for t in self.specs[name].inputs:
            if t.name != "feature":
                self.buffers[t.name].copy_(inputs[t.name])
        if self.cuda_graph:
            self._replay(name)
        else:
            self._execute(name)
        # A copy: the pipeline (a PNDM scheduler, say) may keep the output across steps.
        sample = inputs["sample"]
        return self.buffers["noise"].clone().to(device=sample.device, dtype=sample.dtype)

    def run_full(self, inputs):
        return self._run("full", inputs)

    def run_shallow(self, inputs):
        return self._run("shallow", inputs)

    def refit(self, unet) -> None:
        """Push `unet`'s current weights into both engines (built with refittable=True)."""
        from ..split import split_unet

        if self.refit_maps is None or not all(e.refittable for e in self.engines.values()):
            raise RuntimeError("these TensorRT engines are not refittable; build them with refittable=True")
        graphs = dict(zip(GRAPHS, split_unet(unet, self.branch)))
        torch.cuda.synchronize()
        for name, engine in self.engines.items():
            mapping = json.loads(Path(self.refit_maps[name]).read_text())
            _refit(self.trt, engine, graphs[name].state_dict(), mapping, self.onnx_paths[name])
        self._graphs.clear()  # recaptured at the next call
        logger.info("refitted both TensorRT engines with the U-Net's current weights")


def _refit(trt, engine, state, mapping, onnx_path):
    refitter = trt.Refitter(engine, _trt_logger(trt))
    dtypes, keep = _torch_dtypes(trt), []

    def set_weights(name, tensor):
        proto = refitter.get_weights_prototype(name)
        t = tensor.detach().to(device="cuda", dtype=dtypes[proto.dtype]).contiguous()
        keep.append(t)  # TensorRT reads it during refit_cuda_engine
        if not refitter.set_named_weights(name, trt.Weights(proto.dtype, t.data_ptr(), t.numel()),
                                          trt.TensorLocation.DEVICE):
            raise RuntimeError(f"TensorRT rejected the new weights {name!r} {tuple(t.shape)} {t.dtype}")

    weights, constants = mapping["weights"], set(mapping["constants"])
    unknown = [n for n in refitter.get_all_weights() if n not in weights and n not in constants]
    if unknown:
        raise RuntimeError(f"cannot refit: TensorRT weights {unknown[:5]} are not ONNX initializers this build "
                           "mapped to U-Net parameters; rebuild instead of refitting")
    for name in refitter.get_all_weights():
        if name in weights:
            set_weights(name, _source(state, name, weights[name]))
    missing = refitter.get_missing_weights()
    if missing:  # constants TensorRT wants again alongside the weights they were fused with
        onnx = require("onnx", "onnxruntime", "onnx")
        from onnx import numpy_helper

        inits = {i.name: i for i in onnx.load(str(onnx_path)).graph.initializer}
        for name in missing:
            if name not in inits:
                raise RuntimeError(f"cannot refit: TensorRT asks for weights {name!r} that no initializer provides")
            set_weights(name, torch.from_numpy(numpy_helper.to_array(inits[name]).copy()))
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"TensorRT refit failed; still missing: {refitter.get_missing_weights()}")


def _source(state, name, entry) -> torch.Tensor:
    """The initializer's value from the current weights; every parameter merged into it must still agree."""
    values = []
    for key, how in entry["sources"]:
        if key not in state:
            raise RuntimeError(f"cannot refit: initializer {name!r} was made from {key!r}, which this U-Net lacks")
        t = state[key].t() if how == "transpose" else state[key]
        values.append(t.reshape(entry["shape"]))
    for (key, _), v in zip(entry["sources"][1:], values[1:]):
        if not torch.equal(v, values[0]):
            raise RuntimeError(f"cannot refit: {entry['sources'][0][0]!r} and {key!r} were equal at export, so the "
                               f"exporter may have merged them into the initializer {name!r}, but now differ; rebuild "
                               "the engine")
    return values[0]


def create_runner(unet, branch: int, pipe=None, engine_dir=None, cuda_graph: bool = False, **build_options):
    """Load built plans from `engine_dir`, or (without one) build them now into a temporary directory: then
    height/width (and batch_size, cfg, dtype, fp16, refittable) are required, as for a build."""
    from ..build import open_engine_dir

    _require_trt()  # before any export or build work
    if engine_dir is None:
        engine_dir = _build_in_memory(pipe, branch, **build_options)
    elif build_options:
        raise ValueError(f"options {sorted(build_options)} are fixed by the engine in {engine_dir}")
    manifest, specs = open_engine_dir(engine_dir, unet, branch, "tensorrt")

    def paths(kind):
        return {name: Path(engine_dir) / manifest.graph_file(name, kind) for name in GRAPHS}

    refit_maps = paths("refit_map") if manifest.build.get("refittable") else None
    return TrtRunner(paths("plan"), specs, branch, cuda_graph=cuda_graph, refit_maps=refit_maps,
                     onnx_paths=paths("onnx"))


def _build_in_memory(pipe, branch, height=None, width=None, batch_size=1, cfg=True, dtype=None, fp16=False,
                     refittable=False, **options):
    import tempfile

    from ..build import build_engines

    if pipe is None or height is None or width is None:
        raise ValueError("backend 'tensorrt' needs engine_dir=..., or height=, width= (and batch_size=, cfg=) to "
                         "build its static-shape engines now")
    dtype = dtype or str(pipe.unet.dtype).removeprefix("torch.")
    build = BuildConfig(height=height, width=width, batch_size=batch_size, cfg=cfg, dtype=dtype, branch=branch,
                        backend="tensorrt", device="cuda", fp16=fp16, refittable=refittable, options=options)
    directory, _ = build_engines(pipe, build, out_dir=tempfile.mkdtemp(prefix="dcaccel-engines-"),
                                 model_name="in-memory")
    return directory
