"""Export a split graph to ONNX with static shapes.

Shared by the onnxruntime and tensorrt backends: TensorRT engines are built from the same ONNX files. Every
build is then checked against eager PyTorch by graphs.verify, through the runner that will serve it.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import require
from .ops import exportable
from .spec import GraphSpec, PositionalGraph

logger = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
# Above this the protobuf limit (2 GiB) is near: weights go to one external data file beside the graph.
EXTERNAL_DATA_BYTES = 1 << 30
INLINE_BYTES = 1024  # in an external-data export, initializers smaller than this stay in the graph file
ALIGN = 4096
CHUNK = 64 << 20


def uses_external_data(init) -> bool:
    from onnx.external_data_helper import uses_external_data as uses

    return uses(init)


def export_onnx(graph: torch.nn.Module, spec: GraphSpec, path: Path, exporter: str = "torchscript",
                opset: int = 17) -> list[str]:
    """Write `graph` to `path` (plus `path.data` for large models). Returns the files written, relative to
    path's directory."""
    require("onnx", "onnxruntime", "onnx")
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
        files, size = finish_export(raw, path, spec)
    logger.info("exported %s graph to %s (%.1f MB of weights)", spec.name, path, size / 1e6)
    return files


def finish_export(raw: Path, path: Path, spec: GraphSpec) -> tuple[list[str], int]:
    """Turn an exporter's file `raw` (with its external data files beside it, if any) into ours at `path`:
    inputs as the spec declares them; weights over EXTERNAL_DATA_BYTES in all go to one page-aligned file
    `path.data`, streamed from the exporter's files a tensor at a time, so that no copy of the model is ever
    held in memory; tensors in node attributes (Constant values) are put back into the graph file. Returns
    (files written, relative to path's directory; bytes of weights)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    model = onnx.load(str(raw), load_external_data=False)
    _keep_unused_inputs(model, spec)
    for tensor in _attribute_tensors(model.graph):  # constants of nodes, small: inline, as exporters write them
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(raw.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    size = sum(_nbytes(init) for init in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        data = path.name + ".data"
        _stream_external_data(model, raw.parent, path.parent / data, data)
        files = [path.name, data]
    else:
        for init in model.graph.initializer:
            if uses_external_data(init):
                load_external_data_for_tensor(init, str(raw.parent))
                init.data_location = onnx.TensorProto.DEFAULT
                del init.external_data[:]
        files = [path.name]
    onnx.save_model(model, str(path))
    return files, size


def _attribute_tensors(graph):
    """Every tensor held in a node attribute of `graph` and its subgraphs (Constant values, say)."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _attribute_tensors(attr.g)
            for g in attr.graphs:
                yield from _attribute_tensors(g)


def _nbytes(init) -> int:
    """Bytes of an initializer's data, inline or external."""
    from onnx import helper

    if uses_external_data(init):
        return int(np.prod(init.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return init.ByteSize()


def _external_location(init, base: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external initializer's data."""
    from onnx import helper

    info = {e.key: e.value for e in init.external_data}
    length = int(np.prod(init.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return base / info["location"], int(info.get("offset", 0)), int(info.get("length", length))


def _external_chunks(init, base: Path):
    """An external initializer's bytes, read from its file in chunks of at most CHUNK bytes."""
    src, offset, length = _external_location(init, base)
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, CHUNK))
            if not chunk:
                raise OSError(f"{src} ends {left} bytes before initializer {init.name}'s data")
            yield chunk
            left -= len(chunk)


def _stream_external_data(model, source_dir: Path, data_path: Path, location: str) -> None:
    """Move every initializer of `model` over INLINE_BYTES into one file, `data_path` (which `model` then names as
    `location`): external ones copied from their files under source_dir in chunks, inline ones from the proto.
    Offsets are page-aligned (ONNX Runtime can then map the file instead of reading it)."""
    import onnx
    from onnx import numpy_helper

    with open(data_path, "wb") as out:
        for init in model.graph.initializer:
            if uses_external_data(init):
                length = _external_location(init, source_dir)[2]
                start = out.seek(-(-out.tell() // ALIGN) * ALIGN)
                for chunk in _external_chunks(init, source_dir):
                    out.write(chunk)
                del init.external_data[:]
            elif init.ByteSize() >= INLINE_BYTES:
                raw = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
                start = out.seek(-(-out.tell() // ALIGN) * ALIGN)
                out.write(raw)
                length = len(raw)
                for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    init.ClearField(name)
            else:
                continue
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(start)), ("length", str(length))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value


def initializer_digests(path: Path, digest) -> list[tuple[str, np.dtype, tuple, str]]:
    """(name, numpy dtype, shape, digest(bytes)) of every initializer of the ONNX file at `path`, reading one
    tensor at a time (external data in chunks): `digest` is a hashlib constructor; the digest is that of the
    tensor's contiguous little-endian bytes."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    out = []
    for init in model.graph.initializer:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        h = digest()
        if uses_external_data(init):
            for chunk in _external_chunks(init, Path(path).parent):
                h.update(chunk)
        else:
            h.update(np.ascontiguousarray(numpy_helper.to_array(init)).view(np.uint8).reshape(-1).data)
        out.append((init.name, dtype, tuple(init.dims), h.hexdigest()))
    return out


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
