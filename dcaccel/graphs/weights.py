"""The weight map of an exported graph: which of the graph's parameters each ONNX initializer holds.

One map serves every refit (new weights without a new export): ONNX Runtime opens new sessions with the mapped
initializers replaced, TensorRT's refitter is given the same values under the same names (its ONNX parser names
weights after the initializers). Parameters are named as the split graph names them (`graph.named_parameters`),
which is the same for every split of the same architecture at the same cut.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import EngineError, require

WEIGHT_MAP_FORMAT = 3


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data).hexdigest()


def _numpy_dtype(name: str) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, name)).dtype


def graph_parameters(graph: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(graph.named_parameters(remove_duplicate=False))


def weight_map(onnx_path: Path, graph: torch.nn.Module, spec=None, exporter: str = "torchscript",
               opset: int = 17) -> dict:
    """Map each initializer of an exported graph to the graph parameters it holds, by value.

    The torchscript exporter keeps a parameter's name when it uses the tensor as it is, but constant folding
    stores Linear weights transposed for MatMul (as onnx::MatMul_N) and GroupNorm affine parameters reshaped
    (onnx::Mul_N / onnx::Add_N), and it stores parameters with equal values once (all the norm weights that are
    still ones). So names are not enough: an initializer maps to every parameter whose values, as they are,
    reshaped or transposed, are exactly its bytes. Returns

      initializers:    {name: {shape, dtype, params: [[parameter, "reshape" | "transpose"], ...]}}
      unmapped_params: {parameter: digest} used by the graph but held by no initializer as such; a refit
                       refuses if any of them changed
      constants:       float initializers that hold no parameter and do not depend on any (folded from
                       buffers, e.g. SD3's cropped position embedding): kept as they are by a refit
      unmatched:       float initializers of more than one value that hold no parameter but change with the
                       parameters (derived from weights some other way): if there are any, the engine cannot be
                       refitted

    Which unmatched initializers are constants is found by exporting the graph again with every parameter
    changed (and put back exactly afterwards): those whose bytes stay the same depend on no parameter. That
    second export is made only when there are such initializers, and only with `spec` given.
    """
    onnx = require("onnx", "onnxruntime", "onnx")
    from onnx import numpy_helper

    params = {name: p.detach().to("cpu") for name, p in graph_parameters(graph).items()}
    model = onnx.load(str(onnx_path), load_external_data=True)
    inits = [(i.name, numpy_helper.to_array(i)) for i in model.graph.initializer]
    table: dict[tuple[str, str], list] = {}
    for dtype in {a.dtype for _, a in inits if a.dtype.kind == "f"}:
        torch_dtype = _numpy_dtype(dtype.name)
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
    constants = []
    if unmatched and spec is not None:
        constants = _independent_of_parameters(graph, spec, dict(inits), unmatched, exporter, opset, onnx_path)
        unmatched = [n for n in unmatched if n not in constants]
    return {"format": WEIGHT_MAP_FORMAT, "initializers": mapped, "unmapped_params": unmapped,
            "constants": constants, "unmatched": unmatched}


def _independent_of_parameters(graph, spec, inits: dict, names: list[str], exporter: str, opset: int,
                               onnx_path: Path) -> list[str]:
    """Those of `names` whose values are the same in an export of `graph` with every parameter changed."""
    import tempfile

    from onnx import numpy_helper

    from .onnx import export_onnx

    onnx = require("onnx", "onnxruntime", "onnx")
    params = list(graph_parameters(graph).values())
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.mul_(1.5).add_(0.25)
        with tempfile.TemporaryDirectory(dir=Path(onnx_path).parent) as tmp:
            path = Path(tmp) / "perturbed.onnx"
            export_onnx(graph, spec, path, exporter=exporter, opset=opset)
            again = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
                     if i.name in names}
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
    return [n for n in names if n in again and again[n].shape == inits[n].shape and
            _digest(again[n]) == _digest(inits[n])]


def read_weight_map(path: Path, what: str) -> dict:
    """A weight map file, checked: a clear EngineError for garbage or another format."""
    try:
        wmap = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{what}: the weight map {path} cannot be read ({type(e).__name__}: {e}); rebuild the "
                          "engine (--force)") from e
    if not isinstance(wmap, dict) or wmap.get("format") != WEIGHT_MAP_FORMAT or not all(
            isinstance(wmap.get(k), t) for k, t in (("initializers", dict), ("unmapped_params", dict),
                                                     ("constants", list), ("unmatched", list))):
        raise EngineError(f"{what}: {path} is not a weight map of format {WEIGHT_MAP_FORMAT}; rebuild the engine "
                          "(--force)")
    return wmap


def refittable(wmap: dict) -> bool:
    return not wmap["unmatched"]


def initializer_values(graph: torch.nn.Module, wmap: dict, what: str = "graph") -> dict[str, torch.Tensor]:
    """The values each mapped initializer must hold for `graph`'s current weights (CPU tensors in the
    initializer's shape and dtype). Raises EngineError if the graph cannot be refitted this way."""
    if wmap["unmatched"]:
        raise EngineError(f"{what}: the exported graph holds weights in initializers that are no plain copy of a "
                          f"parameter ({', '.join(wmap['unmatched'][:5])}); it cannot be refitted, rebuild it")
    params = graph_parameters(graph)
    needed = {p for info in wmap["initializers"].values() for p, _ in info["params"]} | set(wmap["unmapped_params"])
    missing = sorted(needed - set(params))
    if missing:
        raise EngineError(f"{what}: the model has no parameters {missing[:5]}; the engine is for another model, or "
                          "adapter layers (an unfused LoRA) replaced some of its modules")
    changed = [n for n, digest in wmap["unmapped_params"].items()
               if _digest(params[n].detach().to("cpu").numpy()) != digest]
    if changed:
        raise EngineError(f"{what}: parameters {changed[:5]} changed, and the exported graph holds them in no "
                          "initializer a refit can replace; rebuild the engine")
    values = {}
    with torch.no_grad():
        for name, info in wmap["initializers"].items():
            dtype, shape = _numpy_dtype(info["dtype"]), tuple(info["shape"])
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
