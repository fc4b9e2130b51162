"""TensorRT: both graphs built from the same ONNX export as the onnxruntime backend into static-shape plans, run on
buffers allocated and bound once (the full graph's cache outputs are the shallow graph's cache inputs),
optionally replayed as CUDA graphs, and refittable with new weights (LoRA swaps) without a rebuild.

Written against the TensorRT 10 Python API documentation and NVIDIA's demo/Diffusion engine code, and never run
on the machines this project is developed on: they have no GPU and TensorRT does not install there. Only the
error paths (no CUDA, no tensorrt) and the weight map behind `refit` are tested on CPU; the rest is covered by
GPU tests that skip elsewhere. TensorRT 11 (which torch-tensorrt 2.13 in the `gpu` extra pulls in) removed
BuilderFlag.FP16 and BF16: there fp16 and bf16 engines come only from a graph of that dtype (build
dtype="float16" or "bfloat16"; TensorRT 10 gets the flag as well). The bf16 ONNX export they are built from is
tested on CPU (tests/test_dtypes.py); the engines are not.

Refit uses the build's weight map (graphs.weights, the same one the onnxruntime backend refits with): TensorRT's
ONNX parser names each weight after its initializer, so every mapped initializer gets its parameters' current
values, and constants no parameter feeds are given again from the ONNX file when TensorRT asks for them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EngineError
from ..graphs.buffers import allocate_graph_buffers
from ..graphs.onnx import EXPORTERS, export_onnx
from ..graphs.spec import GRAPHS
from ..graphs.weights import initializer_values, read_weight_map, weight_map
from .base import BackendOptions, check_static_shapes, option, require

logger = logging.getLogger(__name__)

NAME = "tensorrt"
VERSIONS = ("tensorrt",)  # a plan runs only on the TensorRT version (and GPU) that built it
# A build whose engine differs more from eager logs a warning (TensorRT allows TF32 in float32 engines by default).
TOLERANCE = {"float32": (1e-2, 1e-2), "float16": (5e-2, 5e-2), "bfloat16": (1e-1, 1e-1)}
STRICT = False
FILES_REQUIRED = True
TIMING_CACHE = "timing.cache"  # beside the key directories: every build of a model reuses it


@dataclass(frozen=True)
class Options(BackendOptions):
    backend = NAME
    exporter: str = option("torchscript", "ONNX exporter the plans are built from", build=True, choices=EXPORTERS)
    opset: int = option(17, "ONNX opset of the export", build=True, minimum=14)
    fp16: bool = option(False, "allow fp16 kernels in a float32 engine (TensorRT 10; TensorRT 11 builds fp16 only "
                               "from a float16 graph)", build=True)
    refittable: bool = option(False, "build refittable engines (LoRA swaps without a rebuild; slightly slower)",
                              build=True)
    workspace_gb: float = option(0.0, "builder workspace limit in GiB (0: TensorRT's default)", build=True,
                                 minimum=0.0)
    cuda_graph: bool = option(False, "replay each graph as a CUDA graph after its first call")


def _require_trt():
    if not torch.cuda.is_available():
        raise RuntimeError("backend 'tensorrt' needs a CUDA GPU; torch sees none (torch.cuda.is_available() is "
                           "False). Use backend 'onnxruntime' or 'torch_compile' on this machine")
    return require("tensorrt", NAME, "gpu")


def check_settings(options: Options, dtype: str) -> None:
    """What a build refuses whatever the machine (tested on CPU)."""
    if dtype not in TOLERANCE:
        raise ValueError(f"tensorrt builds take dtype {', '.join(TOLERANCE)}, got {dtype!r}")
    if dtype == "bfloat16" and options.refittable:
        raise ValueError("refittable=True takes dtype float32 or float16: the weight map a refit uses cannot hold "
                         "bfloat16 initializers yet; build bf16 engines without refittable (a LoRA swap then "
                         "rebuilds) or refittable fp16 ones")


def check_available(options: Options, dtype: str) -> None:
    check_settings(options, dtype)
    trt = _require_trt()
    require("onnx", NAME, "onnx")  # plans are built from the ONNX export
    if dtype == "bfloat16" and not hasattr(trt.DataType, "BF16"):
        raise ValueError(f"TensorRT {trt.__version__} has no bfloat16 (DataType.BF16 came in TensorRT 9): build "
                         "with dtype='float16'")
    if options.fp16 and dtype == "float32" and not hasattr(trt.BuilderFlag, "FP16"):
        raise ValueError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (strong typing only): build with "
                         "dtype='float16' for fp16 kernels")


@functools.lru_cache(maxsize=None)
def _trt_logger(trt):
    return trt.Logger(trt.Logger.WARNING)  # one for the process: TensorRT warns when builders get different ones


def _torch_dtypes(trt) -> dict:
    out = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
           trt.DataType.INT64: torch.int64}
    if hasattr(trt.DataType, "BF16"):
        out[trt.DataType.BF16] = torch.bfloat16
    return out


def build(graphs, specs, directory: Path, options: Options):
    """Export both graphs to ONNX (with their weight maps) and build a plan from each."""
    trt = _require_trt()
    directory = Path(directory)
    fp16 = options.fp16 or specs["full"].inputs[0].dtype == "float16"
    bf16 = specs["full"].inputs[0].dtype == "bfloat16"
    workspace = int(options.workspace_gb * (1 << 30))
    out = {}
    for name in GRAPHS:
        files = export_onnx(graphs[name], specs[name], directory / f"{name}.onnx", exporter=options.exporter,
                            opset=options.opset)
        plan = f"{name}.plan"
        _build_plan(trt, directory / files[0], directory / plan, specs[name], fp16, options.refittable, workspace,
                    directory.parent / TIMING_CACHE, bf16=bf16)
        out[name] = {"files": {"plan": plan, "onnx": files[0], **({"onnx_data": files[1]} if len(files) > 1 else {})},
                     "exporter": options.exporter}
        if options.refittable:
            wmap = f"{name}.weights.json"
            (directory / wmap).write_text(json.dumps(weight_map(directory / files[0], graphs[name], specs[name],
                                                                options.exporter, options.opset)))
            out[name]["files"]["weights"] = wmap
    return out, None


def load(graphs, specs, options: Options, directory=None, graph_files=None) -> "TrtRunner":
    directory = Path(directory)

    def paths(kind):
        return {n: directory / graph_files[n][kind] for n in GRAPHS if graph_files[n].get(kind)}

    return TrtRunner(paths("plan"), specs, cuda_graph=options.cuda_graph,
                     weight_maps=paths("weights") if options.refittable else None, onnx_paths=paths("onnx"))


def _build_plan(trt, onnx_path, plan_path, spec, fp16, refittable, workspace, cache_path, bf16=False):
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
    if bf16 and hasattr(trt.BuilderFlag, "BF16"):  # TensorRT 10; 11 types the network from the bf16 graph itself
        config.set_flag(trt.BuilderFlag.BF16)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    logger.info("building TensorRT plan %s (fp16=%s, bf16=%s, refittable=%s)", plan_path.name, fp16, bf16,
                refittable)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build {plan_path.name} from {onnx_path} (see its log above)")
    with open(plan_path, "wb") as f:
        f.write(plan)
    # the cache is shared by every build of the model: written beside it and renamed, never left half-written
    partial = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.partial")
    partial.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    os.replace(partial, cache_path)


class TrtRunner:
    """One execution context per graph, bound once to buffers allocated from the specs."""

    def __init__(self, plan_paths: dict, specs, cuda_graph: bool = False, weight_maps=None, onnx_paths=None):
        self.trt = trt = _require_trt()
        self.runtime = trt.Runtime(_trt_logger(trt))  # must outlive its engines
        self.specs, self.cuda_graph = specs, cuda_graph
        self.weight_maps, self.onnx_paths = weight_maps, onnx_paths
        self.loras: list[dict] = []
        device = torch.device("cuda", torch.cuda.current_device())
        self.buffers, self.static_shapes = allocate_graph_buffers(specs, device)
        self.engines, self.contexts, self._graphs = {}, {}, {}
        for name, path in plan_paths.items():
            path = Path(path)
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes()) if path.is_file() else None
            if engine is None:
                raise EngineError(f"TensorRT cannot load {path}: missing, truncated, or built by another TensorRT "
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
            raise EngineError(f"TensorRT {name} engine does not match its spec ({'; '.join(diffs)}); rebuild it")

    @property
    def cache(self) -> dict[str, torch.Tensor]:
        return {name: self.buffers[name] for name in self.specs["full"].cache}

    @property
    def feature(self) -> torch.Tensor | None:
        return self.cache.get("feature")

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
        spec = self.specs[name]
        for t in spec.call_inputs:
            self.buffers[t.name].copy_(inputs[t.name])
        if self.cuda_graph:
            self._replay(name)
        else:
            self._execute(name)
        # A copy: the pipeline (a PNDM scheduler, say) may keep the output across steps.
        first = inputs[spec.call_inputs[0].name]
        return self.buffers[spec.output_names[0]].clone().to(device=first.device, dtype=first.dtype)

    def run_full(self, inputs):
        return self._run("full", inputs)

    def run_shallow(self, inputs):
        return self._run("shallow", inputs)

    def refit(self, graphs) -> float:
        """Push the current weights of `graphs` into both engines (built with refittable=True)."""
        import time

        if self.weight_maps is None or not all(e.refittable for e in self.engines.values()):
            raise EngineError("these TensorRT engines are not refittable; build them with refittable=True")
        start = time.perf_counter()
        torch.cuda.synchronize()
        for name, engine in self.engines.items():
            what = f"{name} graph ({self.onnx_paths[name]})"
            values = initializer_values(graphs[name], read_weight_map(self.weight_maps[name], what), what)
            _refit(self.trt, engine, values, self.onnx_paths[name])
        self._graphs.clear()  # recaptured at the next call
        logger.info("refitted both TensorRT engines with the model's current weights")
        return time.perf_counter() - start

    def close(self) -> None:
        self._graphs.clear()
        self.contexts, self.engines = {}, {}


def _refit(trt, engine, values: dict[str, torch.Tensor], onnx_path) -> None:
    """Give `engine` the mapped initializers' values; constants TensorRT asks for again come from the ONNX file."""
    refitter = trt.Refitter(engine, _trt_logger(trt))
    dtypes, keep = _torch_dtypes(trt), []

    def set_weights(name, tensor):
        proto = refitter.get_weights_prototype(name)
        t = tensor.detach().to(device="cuda", dtype=dtypes[proto.dtype]).contiguous()
        keep.append(t)  # TensorRT reads it during refit_cuda_engine
        if not refitter.set_named_weights(name, trt.Weights(proto.dtype, t.data_ptr(), t.numel()),
                                          trt.TensorLocation.DEVICE):
            raise EngineError(f"TensorRT rejected the new weights {name!r} {tuple(t.shape)} {t.dtype}")

    for name in refitter.get_all_weights():
        if name in values:
            set_weights(name, values[name])
    missing = refitter.get_missing_weights()
    if missing:  # constants no parameter feeds, wanted again alongside the weights they were fused with
        onnx = require("onnx", NAME, "onnx")
        from onnx import numpy_helper

        inits = {i.name: i for i in onnx.load(str(onnx_path)).graph.initializer}
        for name in missing:
            if name not in inits:
                raise EngineError(f"cannot refit: TensorRT asks for weights {name!r} that no initializer provides; "
                                  "rebuild instead of refitting")
            set_weights(name, torch.from_numpy(numpy_helper.to_array(inits[name], base_dir=str(Path(onnx_path).parent))
                                               .copy()))
    if not refitter.refit_cuda_engine():
        raise EngineError(f"TensorRT refit failed; still missing: {refitter.get_missing_weights()}")
