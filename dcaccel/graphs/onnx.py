"""Export a split graph to ONNX with static shapes.

Shared by the onnxruntime and tensorrt backends: TensorRT engines are built from the same ONNX files. Every
build is then checked against eager PyTorch by graphs.verify, through the runner that will serve it.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import require
from .ops import exportable
from .spec import GraphSpec, PositionalGraph

logger = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
# Above this the protobuf limit (2 GiB) is near: weights go to one external data file beside the graph.
EXTERNAL_DATA_BYTES = 1 << 30


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
        with torch.no_grad(), warnings.catch_warnings(), exportable():
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
        _keep_unused_inputs(model, spec)
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


def _keep_unused_inputs(model, spec: GraphSpec) -> None:
    """The exporter drops inputs the graph never reads (a ControlNet cut at branch 0 reads no text, say); declare
    them again, in the spec's order, so that every engine of a family takes the inputs its spec names."""
    import onnx

    present = {i.name: i for i in model.graph.input}
    if all(t.name in present for t in spec.inputs):
        return
    inputs = []
    for t in spec.inputs:
        if t.name in present:
            inputs.append(present[t.name])
        else:
            elem = getattr(onnx.TensorProto, {"float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16",
                                              "int64": "INT64", "int32": "INT32"}[t.dtype])
            inputs.append(onnx.helper.make_tensor_value_info(t.name, elem, list(t.shape)))
    extra = [i for i in model.graph.input if i.name not in {t.name for t in spec.inputs}]  # initializers as inputs
    del model.graph.input[:]
    model.graph.input.extend(inputs + extra)


def _device_of(module: torch.nn.Module):
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
