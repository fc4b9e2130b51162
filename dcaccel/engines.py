"""The engine layer: the one place that keys, builds, writes, reads and verifies engine directories.

    build_engines(pipe, BuildConfig(...), out_dir, model_name)   offline: engines/<model>/<key>/
    open_runner(pipe, cut, backend, engine_dir=... | height=..., ...)   a runner for dcaccel.enable

An engine directory holds both graphs of one backend and manifest.json. The key is a hash of exactly what
determines the graphs: the model family, its architecture config (normalised: no private `_` keys, no paths),
the weights' hash, the fused LoRAs, the shapes, dtype and cut, the backend and its build options, the pipeline
geometry, the graph specs and the library versions the backend's files depend on. Loading recomputes all of that
for the pipeline at hand and refuses the engine naming every field that differs, with both values in full; it
refuses a manifest edited after the build (the manifest carries its own sha256) and any file whose sha256 is not
the recorded one.

Builds are written to `.<key>.partial-<pid>-*` beside the target and swapped into place in one atomic rename
(Linux renameat2 RENAME_EXCHANGE where a forced rebuild replaces a directory), so that no moment leaves a
half-written engine or none at all; partial directories of builds whose process is gone are removed by the next
build. In-memory builds (enable without engine_dir) go to a per-process scratch directory removed when the runner
is freed or the process exits (and by the next process, if this one was killed).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path

import torch

from .backends import get_backend
from .config import BuildConfig, DeepCacheConfig
from .errors import EngineError
from .families import family_of_pipeline
from .families.base import RELEASED
from .families.controlnet import controlnets_of
from .graphs import verify
from .graphs.spec import GRAPHS, GraphSpec, dtype_name, specs_from_dict, specs_to_dict

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ENGINE_BACKENDS = ("onnxruntime", "tensorrt", "torch_compile")
_LORAS = "_dcaccel_fused_loras"  # the record of the LoRAs fused into a pipeline's weights (set by dcaccel.lora)


# -- what determines the graphs ------------------------------------------------------------------------------------


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer, in name order (not in
    state_dict order, which follows the order submodules were set: code that swaps a submodule out and back, as
    cache-dit does with the transformer blocks, changes the order and nothing else)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        if t.numel():
            h.update(t.numpy())
    return h.hexdigest()


def weights_fingerprint(module: torch.nn.Module, values: bool = True) -> tuple:
    """A cheap fingerprint of `module`'s weights, taken at every pipeline call: which tensors (names, identities,
    storage, dtype, device, shape) and, with `values`, the norm of each floating-point tensor (one pass over the
    weights: detects new values written in place, e.g. a LoRA fused by diffusers, which PyTorch's version counters
    do not see)."""
    named = sorted(list(module.named_parameters(remove_duplicate=False))
                   + list(module.named_buffers(remove_duplicate=False)), key=lambda item: item[0])
    structure = tuple((n, id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for n, t in named)
    if not values:
        return structure, None
    groups: dict[tuple, list[torch.Tensor]] = {}
    for _, t in named:
        if t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    with torch.no_grad():
        norms = [torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32)).cpu() for ts in groups.values()]
    return structure, torch.cat(norms) if norms else torch.zeros(0)


def fingerprints_equal(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("dcaccel", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
                "tensorrt"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if "torch" in out:
        out["torch"] = torch.__version__  # with its local build tag (+cpu, +cu128): the build matters too
    return out


def fused_loras(pipe) -> list[dict]:
    """The record ({name, sha256, scale} per LoRA, in order) of the LoRAs dcaccel.lora fused into `pipe`."""
    return [dict(r) for r in pipe.__dict__.get(_LORAS, [])]


def record_fused_loras(pipe, record: list[dict]) -> None:
    """Set by dcaccel.lora whenever the fused LoRAs change; engines are keyed and checked against it."""
    if record:
        pipe.__dict__[_LORAS] = [dict(r) for r in record]
    else:
        pipe.__dict__.pop(_LORAS, None)


def canonical(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def engine_fields(family, denoiser, cut: dict, build: BuildConfig, geometry: dict, specs: dict[str, GraphSpec],
                  backend, build_options: dict, whash: str, loras: list[dict]) -> dict:
    """Exactly what determines an engine's graphs: hashed into its key, compared field by field on load."""
    versions = library_versions()
    return {
        "format": FORMAT_VERSION,
        "family": family.name,
        "model_config": family.config_dict(denoiser),
        "weights_hash": whash,
        "loras": loras,
        "build": {"height": build.height, "width": build.width, "batch_size": build.batch_size, "cfg": build.cfg,
                  "dtype": build.dtype, **cut, "backend": backend.NAME, "options": build_options,
                  # ControlNet engines only (older U-Net and SD3 engines have no such field)
                  **({"guess_mode": build.guess_mode} if family.name == "controlnet" else {}),
                  # with IP-Adapters only (engines without them keep their keys)
                  **({"ip_adapter_images": build.ip_adapter_images, "ip_adapter_masks": build.ip_adapter_masks}
                     if "ip_adapter_embeds" in geometry else {})},
        "geometry": geometry,
        "specs": specs_to_dict(specs),
        "versions": {pkg: versions.get(pkg) for pkg in backend.VERSIONS},
    }


def engine_key(fields: dict) -> str:
    return hashlib.sha256(canonical(fields).encode()).hexdigest()[:16]


# -- manifests -------------------------------------------------------------------------------------------------------

_REQUIRED = {"format": int, "key": str, "family": str, "model_config": dict, "weights_hash": str, "loras": list,
             "build": dict, "geometry": dict, "specs": dict, "graphs": dict, "versions": dict, "manifest_sha256": str}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class Manifest:
    """A manifest.json read and checked: complete, unedited, naming only files inside its directory."""

    def __init__(self, data: dict, directory: Path):
        self.data, self.directory = data, Path(directory)

    @property
    def key(self) -> str:
        return self.data["key"]

    @property
    def build(self) -> dict:
        return self.data["build"]

    @property
    def specs(self) -> dict[str, GraphSpec]:
        return specs_from_dict(self.data["specs"])

    def graph_files(self) -> dict[str, dict[str, str]]:
        return {name: dict(self.data["graphs"][name]["files"]) for name in GRAPHS}

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise EngineError(f"{directory} is not an engine directory: {MANIFEST} is missing (build it with "
                              "build_scripts/build.py or `dcaccel build`)")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EngineError(f"{path} is not valid JSON ({e}); rebuild with --force") from e
        if not isinstance(data, dict):
            raise EngineError(f"{path} must hold a JSON object, it holds a {type(data).__name__}; rebuild with --force")
        if data.get("format") != FORMAT_VERSION:
            raise EngineError(f"{path} has format {data.get('format')!r}, this dcaccel reads format {FORMAT_VERSION} "
                              "(an engine built by another dcaccel version); rebuild with --force")
        problems = [f"{k} is missing" if k not in data else f"{k} must be a {t.__name__}"
                    for k, t in _REQUIRED.items() if not isinstance(data.get(k), t)]
        if problems:
            raise EngineError(f"{path} is not a complete manifest ({'; '.join(problems)}); rebuild with --force")
        recorded = data["manifest_sha256"]
        if hashlib.sha256(canonical({k: v for k, v in data.items() if k != "manifest_sha256"}).encode()).hexdigest() \
                != recorded:
            raise EngineError(f"{path} was edited after the build (its content no longer matches its manifest_sha256); "
                              "an edited manifest could run the wrong graphs, so it is refused: rebuild with --force")
        manifest = cls(data, directory)
        manifest._check_structure(path)
        return manifest

    def _check_structure(self, path: Path) -> None:
        data = self.data
        for name in GRAPHS:
            graph = data["graphs"].get(name)
            if not isinstance(graph, dict) or not isinstance(graph.get("files"), dict) \
                    or not isinstance(graph.get("checksums"), dict):
                raise EngineError(f"{path}: graphs.{name} must give its files and checksums; rebuild with --force")
            for rel in list(graph["files"].values()) + list(graph["checksums"]):
                if not isinstance(rel, str) or not _SAFE_NAME.fullmatch(rel) or rel in (".", ".."):
                    raise EngineError(f"{path}: graphs.{name} names the file {rel!r}, which is not a plain file name "
                                      "inside the engine directory; rebuild with --force")
            missing = sorted(set(graph["files"].values()) - set(graph["checksums"]))
            if missing:
                raise EngineError(f"{path}: graphs.{name} has no checksum for {missing}; rebuild with --force")
        try:
            specs = self.specs
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{path}: specs are malformed ({type(e).__name__}: {e}); rebuild with --force") from e
        if set(specs) != set(GRAPHS):
            raise EngineError(f"{path}: specs must describe the graphs {list(GRAPHS)}, found {sorted(specs)}")

    def verify_files(self, hash_files: bool = True) -> float:
        """Every file the manifest lists exists with its recorded size and (hash_files) sha256: a clear error naming
        the file, not a crash or a wrong image deep inside a runtime. Returns the seconds hashing took."""
        start = time.perf_counter()
        for graph, info in self.data["graphs"].items():
            for rel, meta in info["checksums"].items():
                p = self.directory / rel
                if not p.is_file():
                    raise EngineError(f"engine file {p} ({graph} graph) is missing; rebuild with --force")
                if p.stat().st_size != meta.get("size"):
                    raise EngineError(f"engine file {p} ({graph} graph) has {p.stat().st_size} bytes, the manifest "
                                      f"records {meta.get('size')}: truncated or replaced; rebuild with --force")
                if hash_files and file_sha256(p) != meta.get("sha256"):
                    raise EngineError(f"engine file {p} ({graph} graph) does not match its recorded sha256: changed "
                                      "or replaced since the build; rebuild with --force")
        return time.perf_counter() - start

    def check_compatible(self, expected: dict) -> None:
        """Refuse the engine if any field of `expected` differs; name each one with both values in full."""
        diffs = [f"{field}: engine has {_text(have)}, pipeline needs {_text(want)}"
                 for field, (have, want) in _field_pairs(self.data, expected).items() if have != want]
        if diffs:
            raise EngineError(f"engine {self.directory} was built for something else and is refused:\n  "
                              + "\n  ".join(diffs) + "\nrebuild it for this pipeline (build_scripts/build.py with "
                              "this model and its settings, and --force)")
        if engine_key(expected) != self.key:
            raise EngineError(f"{self.directory}: the manifest's key {self.key} is not the hash of its fields; "
                              "rebuild with --force")


_ABSENT = "<absent>"
_PER_KEY = ("model_config", "build", "geometry", "versions", "specs")  # compared key by key (specs: per graph)


def _field_pairs(data: dict, expected: dict) -> dict[str, tuple]:
    """{field: (engine's value, pipeline's value)}: whole values, except that the dicts in _PER_KEY are compared
    key by key (a key only one side has differs too; of `versions` only the expected packages count)."""
    out = {}
    for k, want in expected.items():
        have = data.get(k, _ABSENT)
        if k in _PER_KEY and isinstance(want, dict):
            have = have if isinstance(have, dict) else {}
            keys = set(want) if k == "versions" else set(want) | set(have)
            for sub in sorted(keys, key=str):
                out[f"{k}.{sub}"] = (have.get(sub, _ABSENT), want.get(sub, _ABSENT))
        else:
            out[k] = (have, want)
    return out


def _text(value) -> str:
    return value if value == _ABSENT else canonical(value)


def write_manifest(directory: Path, data: dict) -> None:
    data = json.loads(canonical(data))  # JSON values only, as they will be read back
    for info in data["graphs"].values():
        info["checksums"] = {rel: {"size": (directory / rel).stat().st_size, "sha256": file_sha256(directory / rel)}
                             for rel in info["files"].values()}
    data["manifest_sha256"] = hashlib.sha256(canonical(data).encode()).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(data, indent=1, sort_keys=True))


# -- staging, atomic replacement, leftovers --------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


_LEFTOVER = re.compile(r"\.(?P<target>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[A-Za-z0-9_]+")


def sweep_leftovers(parent: Path) -> list[Path]:
    """Remove what builds killed before they finished left in `parent`: partial directories, and old directories
    of a rebuild (put back in place if the rebuild never got its new directory there). Only directories whose
    process is gone are touched. Returns what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _LEFTOVER.fullmatch(p.name)
        if not m or _pid_alive(int(m["pid"])):
            continue
        target = parent / m["target"]
        if m["kind"] == "old" and not target.exists() and (p / MANIFEST).is_file():
            os.replace(p, target)  # a rebuild killed between its two renames: the old engine goes back
            logger.warning("restored %s from an interrupted rebuild", target)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        logger.info("removed %s, left by a build that did not finish", p)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


class StagingDir:
    """Write a directory under a temporary name beside its target; put it in place only on success, atomically:
    a new target is one rename; a replaced one is swapped in one renameat2 exchange (two renames where that is
    unsupported, with the old directory kept under a name sweep_leftovers restores)."""

    def __init__(self, target: Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-{os.getpid()}-",
                                         dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if not self.target.exists():
            os.replace(self.tmp, self.target)
        elif _exchange(self.tmp, self.target):
            shutil.rmtree(self.tmp, ignore_errors=True)  # now the old directory
        else:
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        return False


_SCRATCH_PREFIX = "dcaccel-engines-"


def scratch_dir() -> Path:
    """A directory for an in-memory build, named after this process; directories of dead processes are removed."""
    base = Path(tempfile.gettempdir())
    for p in base.glob(f"{_SCRATCH_PREFIX}*"):
        m = re.fullmatch(rf"{_SCRATCH_PREFIX}(\d+)-.*", p.name)
        if m and not _pid_alive(int(m[1])):
            shutil.rmtree(p, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=base))


# -- building ---------------------------------------------------------------------------------------------------------


def check_not_released(pipe, attr: str) -> None:
    """Refuse a pipeline whose denoiser (or ControlNet) weights were released: graphs cut, built or run from it
    would compute with empty tensors."""
    controlnet = getattr(pipe, "controlnet", None)
    models = [getattr(pipe, attr, None), *(controlnets_of(controlnet) if controlnet is not None else [])]
    if any(getattr(m, RELEASED, False) for m in models if m is not None):
        raise EngineError(f"this pipeline's {attr} weights were released by dcaccel.enable(..., release_weights=True) "
                          "(an engine held the only copy): nothing can be built or run from them; load the pipeline "
                          "again")


class _Request:
    """A pipeline, the cut and the backend: what both building and opening start from."""

    def __init__(self, pipe, cut_config: DeepCacheConfig | BuildConfig, backend: str):
        self.pipe = pipe
        self.family = family_of_pipeline(pipe)
        self.denoiser = self.family.denoiser(pipe)
        check_not_released(pipe, self.family.denoiser_attr)
        self.family.check(self.denoiser)
        self.cut = self.family.resolve_cut(self.denoiser, cut_config)
        self.backend = get_backend(backend)
        self.geometry = self.family.geometry(pipe)

    def graphs(self) -> dict[str, torch.nn.Module]:
        return dict(zip(GRAPHS, self.family.split(self.denoiser, self.cut)))

    def specs(self, build: BuildConfig) -> dict[str, GraphSpec]:
        return self.family.graph_specs(self.denoiser, self.cut, build, self.geometry)

    def options(self, given: dict):
        options = self.backend.Options.parse(given)
        resolve = getattr(options, "resolved", None)
        return resolve(_device(self.denoiser)) if resolve else options

    def fields(self, build: BuildConfig, specs, options, whash: str, loras: list[dict]) -> dict:
        return engine_fields(self.family, self.denoiser, self.cut, build, self.geometry, specs, self.backend,
                             options.build_options(), whash, loras)


def _device(module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def build_engines(pipe, build: BuildConfig, out_dir: str | Path = "engines", model_name: str = "model",
                  force: bool = False, loras: list | None = None, _weights_hash: str | None = None
                  ) -> tuple[Path, bool]:
    """Build the full and shallow graphs of `pipe`'s denoiser for `build` into out_dir/model_name/<key>/. Returns
    (directory, built): built is False when a complete, verified build with the same key was found and reused.
    `loras` defaults to the LoRAs dcaccel.lora fused into `pipe`."""
    if build.backend not in ENGINE_BACKENDS:
        raise ValueError(f"backend {build.backend!r} builds nothing; engine backends are {list(ENGINE_BACKENDS)}")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", model_name) or model_name in (".", ".."):
        raise ValueError(f"model name must be letters, digits, '_', '-' or '.', got {model_name!r}")
    req = _Request(pipe, build, build.backend)
    options = req.options(build.options)
    if dtype_name(req.denoiser.dtype) != build.dtype:
        raise ValueError(f"build dtype {build.dtype} differs from the model's {dtype_name(req.denoiser.dtype)}: "
                         f"load the pipeline in {build.dtype} (--dtype) or build for its dtype")
    check = getattr(req.backend, "check_available", None)
    if check:
        check(options, build.dtype)
    specs = req.specs(build)
    whash = _weights_hash or weights_hash(req.denoiser)
    loras = fused_loras(pipe) if loras is None else [dict(r) for r in loras]
    fields = req.fields(build, specs, options, whash, loras)
    key = engine_key(fields)
    target = Path(out_dir) / model_name / key
    sweep_leftovers(target.parent)
    if not force and (target / MANIFEST).is_file():
        try:
            manifest = Manifest.read(target)
            manifest.check_compatible(fields)
            manifest.verify_files()
            logger.info("found a complete build with key %s at %s: skipped (use force to rebuild)", key, target)
            return target, False
        except EngineError as e:
            logger.warning("existing build at %s is unusable (%s): rebuilding", target, e)
    graphs = req.graphs()
    start = time.perf_counter()
    with StagingDir(target) as tmp:
        info, runner = req.backend.build(graphs, specs, tmp, options)
        if runner is None:
            runner = req.backend.load(graphs, specs, options, tmp, {n: info[n]["files"] for n in GRAPHS})
        atol, rtol = req.backend.TOLERANCE[build.dtype]
        reached = verify.compare(runner, graphs, specs, atol=atol, rtol=rtol)
        runner.close()
        if req.backend.STRICT:
            verify.check(reached, atol, rtol, f"{req.backend.NAME} build")
        elif not all(e["within"] for outs in reached.values() for e in outs.values()):
            logger.warning("%s build differs from eager PyTorch beyond atol=%s, rtol=%s: %s", req.backend.NAME, atol,
                           rtol, reached)
        for name in GRAPHS:
            info[name]["tolerance"] = {"atol": atol, "rtol": rtol, "reached": reached[name],
                                       "checked_with": f"{req.backend.NAME} runner against eager PyTorch on sample "
                                                       "inputs (dcaccel.graphs.verify)"}
        seconds = time.perf_counter() - start
        write_manifest(tmp, {
            **fields,
            "key": key,
            "model": model_name,
            "graphs": info,
            "versions": {**library_versions(), **fields["versions"]},
            "versions_checked": list(req.backend.VERSIONS),
            "build_seconds": round(seconds, 2),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    logger.info("built %s engines for %s in %.1f s: %s", build.backend, model_name, seconds, target)
    return target, True


# -- opening ----------------------------------------------------------------------------------------------------------


def open_runner(pipe, cut_config: DeepCacheConfig, backend: str = "eager", engine_dir: str | Path | None = None,
                height: int | None = None, width: int | None = None, batch_size: int = 1, cfg: bool = True,
                dtype: str | None = None, guess_mode: bool = False, ip_adapter_images: int = 1,
                ip_adapter_masks: bool = False, verify_files: bool = True, before_load=None, **options):
    """A runner of `pipe`'s denoiser, cut as `cut_config` says, on `backend`: from a built `engine_dir` (checked
    as described above), or built now for height/width/batch_size/cfg (torch_compile compiles in memory,
    onnxruntime and tensorrt build into a scratch directory removed with the runner). Returns (runner, info).
    `before_load` (engines with files): called once the engine is checked against the pipeline, just before its
    files are loaded (enable's release_weights frees the denoiser's weights there)."""
    req = _Request(pipe, cut_config, backend)
    shape_args = {"height": height, "width": width}
    ip_args = {"ip_adapter_images": ip_adapter_images, "ip_adapter_masks": ip_adapter_masks}
    if engine_dir is not None:
        if ip_args != {"ip_adapter_images": 1, "ip_adapter_masks": False}:
            raise ValueError(f"{sorted(ip_args)} are fixed by the engine in {engine_dir}")
        given = {k: v for k, v in shape_args.items() if v is not None}
        if given or dtype is not None:
            raise ValueError(f"{sorted(given) + (['dtype'] if dtype else [])} are fixed by the engine in {engine_dir}")
        return _open_dir(req, Path(engine_dir), options, verify_files=verify_files, before_load=before_load)
    if before_load is not None and not req.backend.FILES_REQUIRED:
        raise ValueError(f"backend {backend!r} loads no engine files: nothing runs before a load")
    if req.backend.NAME == "eager":
        if any(v is not None for v in shape_args.values()) or dtype is not None:
            raise ValueError("backend 'eager' runs any shape: it takes no height, width or dtype")
        options = req.options(options)
        specs = req.specs(_nominal_build(req, **ip_args))
        runner = req.backend.load(req.graphs(), specs, options)
        return runner, {"engine_dir": None, "specs": specs, "cut": req.cut}
    if height is None or width is None:
        raise ValueError(f"backend {backend!r} needs engine_dir=..., or height=, width= (and batch_size=, cfg=) to "
                         "build its static-shape graphs now")
    build = BuildConfig(height=height, width=width, batch_size=batch_size, cfg=cfg, guess_mode=guess_mode, **ip_args,
                        dtype=dtype or dtype_name(req.denoiser.dtype), backend=req.backend.NAME, **req.cut,
                        options={k: v for k, v in options.items() if k in req.backend.Options.build_fields()})
    parsed = req.options(options)
    if not req.backend.FILES_REQUIRED:
        specs = req.specs(build)
        runner = req.backend.load(req.graphs(), specs, parsed)
        runner.loras = fused_loras(pipe)
        return runner, {"engine_dir": None, "specs": specs, "cut": req.cut}
    scratch = scratch_dir()
    try:
        whash = weights_hash(req.denoiser)
        directory, _ = build_engines(pipe, build, out_dir=scratch, model_name="in-memory", _weights_hash=whash)
        runner, info = _open_dir(req, directory, {k: v for k, v in options.items()
                                                  if k not in req.backend.Options.build_fields()},
                                 verify_files=False, _weights_hash=whash, before_load=before_load)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    weakref.finalize(runner, shutil.rmtree, str(scratch), True)
    return runner, {**info, "engine_dir": None, "scratch_dir": scratch}


def _nominal_build(req: _Request, **ip_args) -> BuildConfig:
    """Shapes for the specs of a backend that takes any shape (eager): only the names matter."""
    size = 8 * req.geometry["vae_scale_factor"]
    dtype = dtype_name(req.denoiser.dtype)
    return BuildConfig(height=size, width=size, dtype=dtype if dtype in ("float32", "float16", "bfloat16")
                       else "float32", backend="eager", **req.cut, **ip_args)


def _open_dir(req: _Request, directory: Path, options: dict, verify_files: bool = True,
              _weights_hash: str | None = None, before_load=None):
    manifest = Manifest.read(directory)
    build_fields = req.backend.Options.build_fields()
    recorded = manifest.build.get("options", {})
    fixed = {k: v for k, v in options.items() if k in build_fields and recorded.get(k, _ABSENT) != v}
    if fixed:
        raise ValueError(f"options {sorted(fixed)} are fixed by the engine in {directory} (built with "
                         f"{ {k: recorded.get(k) for k in fixed} }); rebuild to change them")
    parsed = req.options({**{k: v for k, v in recorded.items() if k in build_fields}, **options})
    b = manifest.build
    try:
        build = BuildConfig(height=b["height"], width=b["width"], batch_size=b["batch_size"], cfg=b["cfg"],
                            guess_mode=b.get("guess_mode", False), ip_adapter_images=b.get("ip_adapter_images", 1),
                            ip_adapter_masks=b.get("ip_adapter_masks", False), dtype=dtype_name(req.denoiser.dtype),
                            backend=req.backend.NAME, **req.cut)
    except (KeyError, TypeError, ValueError) as e:
        raise EngineError(f"{directory / MANIFEST}: build settings are malformed ({e}); rebuild with --force") from e
    specs = req.specs(build)
    whash = _weights_hash or weights_hash(req.denoiser)
    expected = req.fields(build, specs, parsed, whash, fused_loras(req.pipe))
    manifest.check_compatible(expected)
    hash_seconds = manifest.verify_files(hash_files=verify_files)
    graphs = req.graphs()
    if before_load is not None:
        before_load()
    runner = req.backend.load(graphs, specs, parsed, directory, manifest.graph_files())
    runner.loras = [dict(r) for r in manifest.data["loras"]]
    logger.info("opened %s engine %s (files verified in %.2f s)", req.backend.NAME, directory, hash_seconds)
    return runner, {"engine_dir": directory, "specs": specs, "cut": req.cut, "manifest": manifest,
                    "hash_seconds": hash_seconds}
