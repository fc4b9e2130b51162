"""Export a split graph to ONNX with static shapes, and check it against PyTorch with polygraphy.

Shared by the onnxruntime and tensorrt backends: TensorRT engines are built from the same ONNX files.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .backends.base import require
from .spec import GraphSpec, PositionalGraph

logger = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
# Above this the protobuf limit (2 GiB) is near: weights go to one external data file beside the graph.
EXTERNAL_DATA_BYTES = 1 << 30
NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


def export_onnx(graph: torch.nn.Module, spec: GraphSpec, path: Path, exporter: str = "torchscript",
                opset: int = 17) -> list[str]:
    """Write `graph` to `path` (plus `path.data` for large models). Returns the files written, relative to
    path's directory."""
    onnx = require("onnx", "onnxruntime", "onnx")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose from {list(EXPORTERS)}")
    path = Path(path)
    args = tuple(spec.sample_inputs(device=_device_of(graph)).values())
    module = PositionalGraph(graph, spec).eval()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "graph.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                torch.onnx.export(module, args, str(raw), input_names=spec.input_names,
                                  output_names=spec.output_names, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
            else:
                torch.onnx.export(module, args, str(raw), input_names=spec.input_names,
                                  output_names=spec.output_names, opset_version=max(opset, 18), dynamo=True,
                                  external_data=True, optimize=True)
        model = onnx.load(str(raw), load_external_data=True)
        size = sum(init.ByteSize() for init in model.graph.initializer)
        if size > EXTERNAL_DATA_BYTES:
            data = path.name + ".data"
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data, size_threshold=1024)
            files = [path.name, data]
        else:
            onnx.save_model(model, str(path))
            files = [path.name]
    logger.info("exported %s graph to %s (%.1f MB of weights)", spec.name, path, size / 1e6)
    return files


def _device_of(module: torch.nn.Module):
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_onnx(graph: torch.nn.Module, spec: GraphSpec, path: Path, atol: float, rtol: float,
               seed: int = 1) -> dict:
    """Run the ONNX file (polygraphy's ONNX Runtime runner, CPU) and the PyTorch graph on the same inputs and
    compare with polygraphy. Returns the error reached per output; raises if it exceeds atol + rtol * |ref|."""
    require("polygraphy", "onnxruntime", "onnx")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc

    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # polygraphy reports every step at INFO on stdout
    feed = {k: v.cpu() for k, v in spec.sample_inputs(seed=seed).items()}
    torch_runner = _TorchRunner(graph, spec)
    ort_runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]))
    results = Comparator.run([torch_runner, ort_runner],
                             data_loader=[{k: v.numpy() for k, v in feed.items()}])
    passed = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol)))
    (_, ref_iters), (_, ort_iters) = results
    reached = {}
    for name in spec.output_names:
        ref, got = np.asarray(ref_iters[0][name], np.float64), np.asarray(ort_iters[0][name], np.float64)
        err = np.abs(ref - got)
        reached[name] = {"max_abs": float(err.max()),
                         "max_rel": float((err / np.maximum(np.abs(ref), 1e-6)).max()),
                         "rel_l2": float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-12))}
    if not passed:
        raise RuntimeError(f"ONNX {spec.name} graph differs from PyTorch beyond atol={atol}, rtol={rtol}: {reached}")
    return {"atol": atol, "rtol": rtol, "reached": reached, "checked_with": "polygraphy Comparator (CPU)"}


class _TorchRunner:
    """A polygraphy runner for a PyTorch graph on whatever device its weights are on (polygraphy's own
    PytRunner moves inputs to CUDA)."""

    def __new__(cls, graph, spec):
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata

        class Runner(BaseRunner):
            def __init__(self):
                super().__init__(name="pytorch", prefix="pytorch-runner")

            def activate_impl(self):
                pass

            def get_input_metadata_impl(self):
                meta = TensorMetadata()
                for t in spec.inputs:
                    meta.add(t.name, NP_DTYPES.get(t.torch_dtype, np.float32), t.shape)
                return meta

            def infer_impl(self, feed_dict):
                import time

                device = _device_of(graph)
                start = time.perf_counter()
                with torch.no_grad():
                    args = [torch.from_numpy(np.ascontiguousarray(feed_dict[n])).to(device) for n in spec.input_names]
                    out = PositionalGraph(graph, spec)(*args)
                out = out if isinstance(out, tuple) else (out,)
                self.inference_time = time.perf_counter() - start
                return {n: o.float().cpu().numpy() for n, o in zip(spec.output_names, out)}

            def deactivate_impl(self):
                pass

        return Runner()
