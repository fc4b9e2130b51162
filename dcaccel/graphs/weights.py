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
    require("onnx", "onnxruntime", "onnx")
    from .onnx import initializer_digests

    # Initializers are read one at a time and only their digests kept: no copy of the weights is made here.
    params = {name: p.detach().to("cpu") for name, p in graph_parameters(graph).items()}
    inits = initializer_digests(onnx_path, hashlib.sha1)
    table: dict[tuple[str, str], list] = {}
    for dtype in {dtype for _, dtype, _, _ in inits if dtype.kind == "f"}:
        torch_dtype = _numpy_dtype(dtype.name)
        for name, t in params.items():
            a = t.to(torch_dtype).numpy()
            table.setdefault((dtype.str, _digest(a)), []).append([name, "reshape"])
            if a.ndim == 2:
                table.setdefault((dtype.str, _digest(a.T)), []).append([name, "transpose"])
            del a
    mapped, used, unmatched = {}, set(), []
    for name, dtype, shape, digest in inits:
        candidates = table.get((dtype.str, digest), []) if dtype.kind == "f" else []
        if candidates:
            mapped[name] = {"shape": list(shape), "dtype": dtype.name, "params": candidates}
            used.update(c[0] for c in candidates)
        elif dtype.kind == "f" and int(np.prod(shape, dtype=np.int64)) > 1:
            unmatched.append(name)
    unmapped = {n: _digest(t.numpy()) for n, t in params.items() if n not in used}
    constants = []
    if unmatched and spec is not None:
        first = {name: (shape, digest) for name, _, shape, digest in inits if name in unmatched}
        constants = _independent_of_parameters(graph, spec, first, exporter, opset, onnx_path)
        unmatched = [n for n in unmatched if n not in constants]
    return {"format": WEIGHT_MAP_FORMAT, "initializers": mapped, "unmapped_params": unmapped,
            "constants": constants, "unmatched": unmatched}


# A mantissa bit per float width: XOR with it changes every normal value by a quarter or more and, done twice,
# restores it exactly. Zeros and subnormals would move by next to nothing (a subnormal that `w + 1` absorbs):
# those elements are set to a normal value and put back from what was kept of them.
_FLIP = {torch.float64: (torch.int64, 1 << 51), torch.float32: (torch.int32, 1 << 22),
         torch.float16: (torch.int16, 1 << 9), torch.bfloat16: (torch.int16, 1 << 6)}


def _flip(p) -> None:
    int_dtype, bit = _FLIP[p.dtype]
    p.view(int_dtype).bitwise_xor_(bit)


def _change(p):
    """Change every value of parameter `p` in place; returns what _restore needs to put it back exactly: the places
    of its zeros and subnormals (indices, or a mask where there are many) and their values unless all are 0."""
    flat = p.view(-1)
    small = flat.abs() < torch.finfo(p.dtype).tiny
    count = int(small.sum())
    where = None
    if count:
        where = small.nonzero().squeeze(1) if 8 * count < flat.numel() else small
        kept = flat[where]
        kept = kept.clone() if bool((kept != 0).any()) else None
    del small
    _flip(p)
    if where is None:
        return None
    flat[where] = 0.25
    return where, kept


def _restore(p, undo) -> None:
    _flip(p)
    if undo is not None:
        where, kept = undo
        p.view(-1)[where] = 0.0 if kept is None else kept


def _independent_of_parameters(graph, spec, first: dict, exporter: str, opset: int, onnx_path: Path) -> list[str]:
    """Those initializers of `first` ({name: (shape, digest)}) whose values are the same in an export of `graph`
    with every parameter changed. The change is made in place and undone exactly (a mantissa bit flipped twice;
    zeros and subnormals set to a normal value and put back), so that no copy of the weights is needed."""
    import tempfile

    from .onnx import export_onnx, initializer_digests

    unique = {}
    for p in graph_parameters(graph).values():
        unique.setdefault((p.data_ptr(), p.dtype, p.shape), p)  # tied parameters changed once
    changed, saved = [], []
    try:
        with torch.no_grad():
            for p in unique.values():
                if not p.is_floating_point():
                    continue
                if p.dtype in _FLIP and p.is_contiguous():
                    changed.append((p, _change(p)))
                else:  # other float widths, or a strided view: changed by value, put back from a copy
                    saved.append((p, p.detach().clone()))
                    p.mul_(1.5).add_(0.25)
        with tempfile.TemporaryDirectory(dir=Path(onnx_path).parent) as tmp:
            path = Path(tmp) / "perturbed.onnx"
            export_onnx(graph, spec, path, exporter=exporter, opset=opset)
            again = {name: (shape, digest) for name, _, shape, digest in initializer_digests(path, hashlib.sha1)
                     if name in first}
    finally:
        with torch.no_grad():
            for p, undo in changed:
                _restore(p, undo)
            for p, value in saved:
                p.copy_(value)
    return [n for n in first if n in again and again[n] == first[n]]


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
