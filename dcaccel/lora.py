"""LoRA on DeepCache pipelines: diffusers' own loaders, fused into the weights, swapped without a rebuild.

A LoRA is read and checked against the pipeline before anything changes (file, format, every key names a module,
every shape fits, scale is a finite number). It is then loaded with diffusers (`load_lora_weights`, so both the
diffusers/PEFT and the kohya `lora_unet_..._lora_down/up` + alpha formats work), weighted with `set_adapters`,
fused with `fuse_lora` and its adapter layers are unloaded again: the U-Net keeps its own modules and parameter
tensors, only their values change. That is what lets a backend take new weights without a new build:

    eager          nothing to copy: the graphs share the U-Net's parameters
    torch_compile  freezing=False: parameters are graph inputs, changed in place, no recompile;
                   freezing=True (the CPU default): frozen weights are constants of the compiled code, so the
                   graphs are compiled again (minutes for SD 1.5 on CPU)
    onnxruntime    new sessions from the same ONNX files, every weight initializer given the new values
    tensorrt       refittable engines (see backends/tensorrt.py)

The weights a LoRA changes are copied once, as they were before it (on the CPU), so that taking it out again
restores them bit for bit; a swap is: restore, fuse the new LoRAs, `runner.refit(unet)`. If any step fails,
the weights, the adapters and the runner are put back as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .engines import record_fused_loras

logger = logging.getLogger(__name__)

_STATE = "_dcaccel_lora"
_LORA_SUFFIXES = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B")
_SHOWN = 5  # how many offending keys or modules an error lists
MAX_SCALE = 100.0  # beyond this a LoRA only drowns the weights (and overflows fp16 ones)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file (safetensors, diffusers/PEFT or kohya keys) and the scale it is fused with.

    name: the adapter name, also recorded in engine manifests; defaults to the file's stem.
    """

    path: str | Path
    scale: float = 1.0
    name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real):
            raise TypeError(f"LoRA scale must be a number, got {self.scale!r} ({type(self.scale).__name__}) "
                            f"for {self.path}")
        if not math.isfinite(self.scale) or abs(self.scale) > MAX_SCALE:
            raise ValueError(f"LoRA scale must be a finite number in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got "
                             f"{self.scale!r} for {self.path}")
        object.__setattr__(self, "scale", float(self.scale))
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_\-]+", self.name):
            raise ValueError(f"LoRA name must be letters, digits, '_' or '-', got {self.name!r}")


# LoRAs shipped in the package (dcaccel/weights/<dir>), by the name the CLI and embedded_lora() know them
EMBEDDED = {"shapes-lcm": ("shapes-lcm-lora", "pytorch_lora_weights.safetensors")}


def embedded_lora(name: str) -> Path:
    """The file of a LoRA shipped with dcaccel: "shapes-lcm" is the LCM-LoRA distilled for the shapes model
    (build_scripts/distill_lcm_lora.py)."""
    from importlib import resources

    if name not in EMBEDDED:
        raise ValueError(f"no embedded LoRA {name!r}; embedded: {sorted(EMBEDDED)}")
    path = Path(str(resources.files("dcaccel").joinpath("weights", *EMBEDDED[name])))
    if not path.is_file():
        raise FileNotFoundError(f"the embedded LoRA {name!r} is missing from {path}: reinstall dcaccel, or distil it "
                                "with build_scripts/distill_lcm_lora.py")
    return path


def parse_lora_argument(text: str) -> LoraSpec:
    """'path[:scale]' (a command-line argument) -> LoraSpec; a suffix that is not a number belongs to the path.
    An embedded LoRA's name (shapes-lcm) stands for its file unless a file or directory of that name exists."""
    from .models import path_and_scale

    path, scale = path_and_scale(text)
    if path in EMBEDDED and not os.path.exists(path):  # a file of that name here comes first
        return LoraSpec(embedded_lora(path), scale)  # named by its file, as when the path is given
    return LoraSpec(path, scale)


def lora_record(loras) -> list[dict]:
    """What an engine manifest records of `loras`: [{"name", "sha256", "scale"}], in order. The file's hash, not
    its path, so a copy elsewhere is the same LoRA."""
    specs = _specs(loras)
    return [{"name": name, "sha256": _file_sha256(s.path), "scale": s.scale} for s, name in zip(specs, _names(specs))]


def current_loras(pipe) -> list[dict]:
    """The record (as lora_record) of the LoRAs dcaccel.lora applied to `pipe`; [] if none."""
    state = pipe.__dict__.get(_STATE)
    return [dict(r) for r in state["record"]] if state else []


def apply_loras(pipe, loras, fuse: bool = True):
    """Load `loras` (LoraSpec, or paths at scale 1) into `pipe`, with or without DeepCache enabled. Returns pipe.

    fuse=True adds them into the weights (what every backend runs; an enabled pipeline's graphs are refitted).
    fuse=False keeps diffusers' adapter layers, for comparison or per-call scale changes: only without DeepCache
    or on the eager backend. Raises, leaving the pipeline as it was, if LoRAs applied here are already on it
    (use swap_loras) or any LoRA does not fit.
    """
    if pipe.__dict__.get(_STATE):
        raise RuntimeError(f"LoRAs {[r['name'] for r in current_loras(pipe)]} are already applied; use "
                           "dcaccel.lora.swap_loras(pipe, loras) to replace them, or remove_loras(pipe)")
    return _change(pipe, _specs(loras), fuse)


def swap_loras(pipe, loras):
    """Replace the LoRAs applied with apply_loras/swap_loras by `loras` (fused), without rebuilding: the weights
    are restored exactly, the new LoRAs fused, and an enabled pipeline's backend refits both of its graphs.
    `loras=[]` takes them all out. Returns pipe; on any error the pipeline is left as it was."""
    state = pipe.__dict__.get(_STATE)
    if state and not state["fused"]:
        raise RuntimeError("the applied LoRAs are not fused (apply_loras(..., fuse=False)); call remove_loras(pipe) "
                           "and then apply_loras")
    return _change(pipe, _specs(loras), fuse=True)


def remove_loras(pipe):
    """Take out the LoRAs applied here: the weights are restored bit for bit and the graphs refitted."""
    if not pipe.__dict__.get(_STATE):
        raise RuntimeError("no LoRAs were applied to this pipeline with dcaccel.lora")
    return _change(pipe, [], fuse=True)


def use_lcm_lora(pipe, lora, num_inference_steps: int = 4, guidance_scale: float = 1.0) -> dict:
    """Fuse an LCM-LoRA (a normal LoRA file, e.g. latent-consistency/lcm-lora-sdv1-5) into `pipe` and switch it to
    diffusers' LCMScheduler. Returns the call arguments: pipe(prompt, **use_lcm_lora(pipe, path)).

    This works with DeepCache enabled: the U-Net stays a standard one (no time_cond_proj_dim), so the pipeline
    passes no timestep_cond, which dcaccel's step loop only rejects for LCM-distilled U-Nets. With
    guidance_scale <= 1 the pipeline runs without classifier-free guidance (batch = images, not images x 2):
    static-shape backends (onnxruntime, torch_compile, tensorrt) must be built with cfg=False for that; with
    guidance_scale > 1 (1-2 suits LCM) they need cfg=True. With 4-8 steps, a DeepCache interval of 2 or 3
    leaves 2-4 full U-Net evaluations.
    """
    import diffusers

    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= 50:
        raise ValueError(f"num_inference_steps must be an integer in 1..50 (LCM: 2-8), got {num_inference_steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (LCM: 1-2), got {guidance_scale!r}")
    state = pipe.__dict__.get(_STATE)
    if state:
        swap_loras(pipe, [*state["specs"], *_specs([lora])])
    else:
        apply_loras(pipe, [lora])
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    logger.info("LCM: LCMScheduler, %d steps, guidance_scale %s", num_inference_steps, guidance_scale)
    return {"num_inference_steps": num_inference_steps, "guidance_scale": float(guidance_scale)}


# -- reading and checking, before anything changes ------------------------------------------------------------


@dataclass
class _LoraFile:
    spec: LoraSpec
    name: str
    sha256: str
    tensors: dict            # the file as read: what diffusers' loader is given
    targets: dict            # component -> names of the modules whose weights it changes


def _specs(loras) -> list[LoraSpec]:
    if isinstance(loras, (str, Path, LoraSpec)):
        loras = [loras]
    specs = [s if isinstance(s, LoraSpec) else LoraSpec(s) for s in loras]
    names = _names(specs)
    if len(set(names)) != len(names):
        raise ValueError(f"LoRA names must differ, got {names}")
    return specs


def _names(specs) -> list[str]:
    """Explicit names, else file stems made into adapter names ('a-b.c' -> 'a_b_c'), numbered if they repeat."""
    names, seen = [], {}
    for s in specs:
        name = s.name or re.sub(r"[^A-Za-z0-9_]", "_", s.path.stem) or "lora"
        if s.name is None and name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        seen.setdefault(name, 1)
        names.append(name)
    return names


def _file_sha256(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _denoiser_attr(pipe) -> str:
    from .families import family_of_pipeline

    return family_of_pipeline(pipe).denoiser_attr


def _components(pipe, denoiser) -> dict:
    """The pipeline's LoRA-loadable models by diffusers' component name, with the original denoiser."""
    attr = _denoiser_attr(pipe)
    out = {}
    for name in pipe._lora_loadable_modules:
        model = denoiser if name == attr else getattr(pipe, name, None)
        if model is not None:
            out[name] = model
    return out


def _read(pipe, denoiser, spec: LoraSpec, name: str) -> _LoraFile:
    from safetensors.torch import load as load_safetensors

    path = spec.path
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    data = path.read_bytes()
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path} is not a safetensors file ({type(e).__name__}: {e}); dcaccel reads LoRAs in "
                         "safetensors format only") from e
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    _check_tensors(path, tensors)
    try:
        # diffusers' own conversion (kohya -> diffusers keys and alphas), on a copy: it pops from what it is given.
        extra = {"unet_config": denoiser.config} if _denoiser_attr(pipe) == "unet" else {}
        converted = type(pipe).lora_state_dict(dict(tensors), **extra)
        converted = converted[0] if isinstance(converted, tuple) else converted
    except Exception as e:
        raise ValueError(f"{path}: diffusers cannot read this LoRA ({type(e).__name__}: {e})") from e
    targets = _check_keys(path, converted, _components(pipe, denoiser), _denoiser_attr(pipe))
    return _LoraFile(spec, name, hashlib.sha256(data).hexdigest(), tensors, targets)


def _check_tensors(path: Path, tensors: dict) -> None:
    """Refuse, before anything is loaded, tensors no LoRA holds: integers, NaN or infinite values."""
    # Weights must be floats; kohya's per-module `.alpha` may be stored as an integer scalar.
    integral = sorted(f"{k}: {str(t.dtype).removeprefix('torch.')}" for k, t in tensors.items()
                      if not t.is_floating_point() and not (k.endswith(".alpha") and t.numel() == 1))
    if integral:
        raise ValueError(f"{path}: {_count(integral, 'tensor')} {'is' if len(integral) == 1 else 'are'} not floating "
                         f"point ({', '.join(integral[:_SHOWN])}); LoRA weights must be float16, bfloat16 or "
                         "float32")
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise ValueError(f"{path}: {_count(bad, 'tensor')} hold NaN or infinite values ({', '.join(bad[:_SHOWN])}); "
                         "a LoRA must be finite")


def _component_state_dicts(converted: dict, components: dict) -> tuple[dict, list[str]]:
    """Split diffusers-format keys by component and bring them into PEFT form as diffusers' loaders do.
    Returns ({component: peft state dict}, keys that belong to no component of this pipeline)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    parts, stray = {}, []
    for key, value in converted.items():
        component, _, rest = key.partition(".")
        if component in components and rest:
            parts.setdefault(component, {})[rest] = value
        else:
            stray.append(key)
    out = {}
    for component, sd in parts.items():
        if component == "unet":
            if "lora_A" not in next(iter(sd)):
                sd = convert_unet_state_dict_to_peft(sd)
        elif component == "transformer":
            if not any(".lora_A." in k or ".lora_B." in k for k in sd):
                sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
        else:
            sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
            if not hasattr(components[component], "text_model"):
                sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        out[component] = sd
    return out, stray


def _module_of(key: str) -> str | None:
    for suffix in _LORA_SUFFIXES:
        if suffix in key:
            return key.split(suffix)[0]
    return None


def _check_keys(path: Path, converted: dict, components: dict, denoiser_attr: str) -> dict:
    """Every key names a module of the pipeline and every lora_A/lora_B pair fits its module's weight.
    Returns {component: [module names]}; raises one ValueError naming what does not fit."""
    parts, stray = _component_state_dicts(converted, components)
    kohya = sorted(k for k in stray if k.startswith(("lora_unet_", "lora_te")))
    unknown = {f"{k} (no component {k.partition('.')[0]!r} in this pipeline)": 1 for k in stray if k not in kohya}
    mismatched = []
    targets = {}
    for component, sd in parts.items():
        modules = dict(components[component].named_modules())
        pairs = {}
        for key, value in sd.items():
            module = _module_of(key)
            if module is None or module not in modules:
                name = f"{component}.{module or key}"
                unknown[name] = unknown.get(name, 0) + 1
                continue
            targets.setdefault(component, set()).add(module)
            if ".lora_A." in key and key.endswith("weight"):
                pairs.setdefault(module, {})["A"] = tuple(value.shape)
            elif ".lora_B." in key and key.endswith("weight"):
                pairs.setdefault(module, {})["B"] = tuple(value.shape)
        for module, ab in pairs.items():
            problem = _shape_problem(modules[module], ab.get("A"), ab.get("B"))
            if problem:
                mismatched.append(f"{component}.{module}: {problem}")
    problems = []
    if kohya:
        problems.append(f"{len(kohya)} kohya-style keys (e.g. {kohya[0]}) beside keys of another format: diffusers "
                        "converts a kohya file only if all of its keys are kohya-style")
    if unknown:
        problems.append(f"{sum(unknown.values())} keys name {_count(unknown, 'module')} the pipeline's models do not "
                        f"have: {', '.join(sorted(unknown)[:_SHOWN])}")
    if mismatched:
        problems.append(f"{_count(mismatched, 'module')} of other shapes than the LoRA's (a LoRA for another "
                        f"architecture?): {'; '.join(sorted(mismatched)[:_SHOWN])}")
    if problems:
        raise ValueError(f"LoRA {path} does not fit this pipeline: " + ". ".join(problems))
    if denoiser_attr not in targets:
        logger.warning("LoRA %s changes no %s weight (only %s)", path, denoiser_attr, sorted(targets))
    return {component: sorted(names) for component, names in targets.items()}


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _shape_problem(module, a, b) -> str | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"{type(module).__name__} has no weight a LoRA can change"
    if a is None or b is None:
        return f"lora_{'A' if a is None else 'B'}.weight is missing"
    if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
        return f"lora_A {a} and lora_B {b} do not multiply"
    delta = (b[0], a[1], *a[2:])
    if delta != tuple(weight.shape):
        return f"the LoRA's update has shape {delta} (lora_B {b} x lora_A {a}), the weight is {tuple(weight.shape)}"
    return None


# -- changing the pipeline --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _plain_denoiser(pipe, dc):
    """While DeepCache is enabled, the pipeline's denoiser is its step loop; diffusers' loaders must see the
    original."""
    if dc is None:
        yield getattr(pipe, _denoiser_attr(pipe))
        return
    from .pipeline import _original_denoiser

    with _original_denoiser(pipe, dc):
        yield dc.denoiser


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers warns for every text encoder a LoRA has no keys for; that is the usual case here."""
    log = logging.getLogger("diffusers.loaders.lora_base")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _weights(components: dict, targets: dict) -> dict:
    """{(component, parameter name): tensor} of the weights (and biases) of the target modules."""
    out = {}
    for component, modules in targets.items():
        model = components[component]
        for module in modules:
            m = model.get_submodule(module)
            m = m.get_base_layer() if hasattr(m, "get_base_layer") else m  # under unfused adapter layers
            for pname, p in m.named_parameters(recurse=False):
                out[(component, f"{module}.{pname}")] = p
    return out


def _copy_back(params: dict, saved: dict) -> None:
    with torch.no_grad():
        for key, value in saved.items():
            params[key].copy_(value)


def _change(pipe, specs: list[LoraSpec], fuse: bool):
    """Go from the LoRAs applied now (none, or fused ones) to `specs`; everything or nothing."""
    from .pipeline import enabled_state

    state = pipe.__dict__.get(_STATE)
    dc = enabled_state(pipe)
    runner = dc.runner if dc else None
    if not fuse and dc and dc.backend != "eager":
        raise ValueError(f"fuse=False keeps LoRA layers beside the weights, which the {dc.backend!r} graphs do "
                         "not contain; fuse them (the default), or use the eager backend")
    with _plain_denoiser(pipe, dc) as denoiser:
        components = _components(pipe, denoiser)
        files = [_read(pipe, denoiser, s, n) for s, n in zip(specs, _names(specs))]
        ours = {r["name"] for r in state["record"]} if state and not state["fused"] else set()
        foreign = {c: [a for a in names if a not in ours] for c, names in pipe.get_list_adapters().items()}
        foreign = {c: names for c, names in foreign.items() if names}
        if foreign:
            raise RuntimeError(f"the pipeline has LoRA adapters loaded outside dcaccel.lora: {foreign}; "
                               "pipe.unload_lora_weights() first (or apply them with dcaccel.lora)")
        start = time.perf_counter()
        old_targets = {c: set(m) for c, m in (state["targets"] if state else {}).items()}
        new_targets = {}
        for f in files:
            for c, modules in f.targets.items():
                new_targets.setdefault(c, set()).update(modules)
        all_targets = {c: old_targets.get(c, set()) | new_targets.get(c, set())
                       for c in set(old_targets) | set(new_targets)}
        params = _weights(components, all_targets)
        saved = {k: p.detach().to("cpu", copy=True) for k, p in params.items()}  # values now, for a rollback
        grads = {(c, n): p.requires_grad for c, m in components.items() for n, p in m.named_parameters()}
        try:
            if state and not state["fused"]:
                _unload_adapters(pipe, components)
            if state:
                _copy_back(params, state["originals"])  # the weights as they were before any LoRA
            # Before any LoRA: the old originals, and for weights no LoRA changed yet, their values now.
            old_originals = state["originals"] if state else {}
            originals = {k: old_originals.get(k, saved[k]) for k in _weights(components, new_targets)}
            if files:
                _load(pipe, files, components, fuse)
            _restore_requires_grad(components, grads)
            _check_finite(components, new_targets)
            if dc is not None:
                dc.refit()
        except BaseException:
            _unload_adapters(pipe, components)
            _copy_back(params, saved)
            unfused = state and not state["fused"]
            if unfused:  # its adapter layers were unloaded: load them again
                _load(pipe, state["files"], components, fuse=False)
            _restore_requires_grad(components, grads)
            if dc is not None:
                dc.check_weights()  # refits only if the restored weights are not those the graphs hold
            raise
    record = [{"name": f.name, "sha256": f.sha256, "scale": f.spec.scale} for f in files]
    if runner is not None:
        runner.loras = [dict(r) for r in record]
    record_fused_loras(pipe, record if fuse else [])
    if files:
        pipe.__dict__[_STATE] = {"specs": specs, "record": record, "fused": fuse, "originals": originals,
                                 "targets": {c: sorted(m) for c, m in new_targets.items()},
                                 "files": None if fuse else files}
    else:
        pipe.__dict__.pop(_STATE, None)
    logger.info("LoRAs %s (%s) in %.2f s%s", [r["name"] for r in record] or "removed",
                "fused" if fuse else "unfused", time.perf_counter() - start,
                f", {dc.backend} graphs refitted" if runner is not None else "")
    return pipe


def _load(pipe, files: list[_LoraFile], components: dict, fuse: bool) -> None:
    names = [f.name for f in files]
    with _quiet_diffusers(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # PEFT, for a second adapter
        for f in files:
            pipe.load_lora_weights(f.tensors, adapter_name=f.name)
        pipe.set_adapters(names, adapter_weights=[f.spec.scale for f in files])
        if fuse:
            loaded = sorted({c for f in files for c in f.targets})
            pipe.fuse_lora(components=loaded, lora_scale=1.0, adapter_names=names)
            pipe.unload_lora_weights()  # keeps the fused values, puts the original modules back


def _unload_adapters(pipe, components: dict) -> None:
    """Remove any adapter layers (ours: foreign ones were refused before); fused values are put back by the
    caller. A load that failed half way (inside diffusers' loader) can leave adapter layers under an empty
    peft_config, which unload_lora_weights skips: those are taken out here as diffusers' unload_lora does."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(getattr(m, "peft_config", None) for m in components.values()):
        pipe.unload_lora_weights()
    for model in components.values():
        if hasattr(model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            from diffusers.utils.peft_utils import recurse_remove_peft_layers

            recurse_remove_peft_layers(model)
            if hasattr(model, "peft_config"):
                del model.peft_config
            if hasattr(model, "_hf_peft_config_loaded"):
                model._hf_peft_config_loaded = None


def _check_finite(components: dict, targets: dict) -> None:
    """The weights a LoRA changed are finite (a large scale can overflow fp16 weights); raise naming them."""
    bad = [f"{c}.{n}" for (c, n), p in _weights(components, targets).items() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"fusing these LoRAs made {_count(bad, 'weight')} NaN or infinite ({', '.join(bad[:_SHOWN])}):"
                         " lower their scales (or load the model in float32)")


def _restore_requires_grad(components: dict, flags: dict) -> None:
    # PEFT marks every base parameter requires_grad=False when it injects adapters; a compiled graph guards on it.
    for c, m in components.items():
        for n, p in m.named_parameters():
            want = flags.get((c, n))
            if want is not None and p.requires_grad != want:
                p.requires_grad_(want)
