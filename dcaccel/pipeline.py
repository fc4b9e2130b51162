"""enable(pipe, ...) / disable(pipe): plug the DeepCache step loop into a diffusers pipeline, and take it out.

While enabled, the pipeline's denoiser attribute (`unet` or `transformer`) is the step loop and its class a
subclass of its own whose __call__:
  - runs one call at a time: a second thread's call waits for the first (a diffusers pipeline keeps per-call
    state on itself, so two calls at once would mix their steps); a call from inside a call is an error;
  - checks that the denoiser's weights are still those the graphs hold (a cheap fingerprint, see
    engines.weights_fingerprint) and refits the graphs if they changed (load_state_dict, a LoRA fused by
    diffusers), or raises where the backend cannot take them (another dtype, a non-refittable engine);
  - starts the step loop afresh, so nothing survives from one call to the next.
`pipe.components`, `save_pretrained` and diffusers' loaders (load_lora_weights, fuse_lora, ...) see the original
denoiser (pipelines made from the components are plain pipelines sharing the weights), and assigning another
denoiser while enabled is refused. disable() gives back
the exact original pipeline: its own denoiser object and class.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from dataclasses import dataclass, field

import torch

from .config import DeepCacheConfig
from .engines import open_runner, weights_fingerprint, fingerprints_equal
from .errors import EngineError
from .families import family_of_pipeline, supported_pipelines
from .families.base import RELEASED
from .graphs.spec import GRAPHS, dtype_name
from .runtime import DeepCacheDenoiser

logger = logging.getLogger(__name__)

_STATE = "_dcaccel_state"
_CLASSES: dict[type, type] = {}
SUPPORTED_PIPELINES = tuple(supported_pipelines())


@dataclass
class EnabledState:
    """What dcaccel.enable did to a pipeline (see enabled_state)."""

    family: object
    denoiser: torch.nn.Module          # the original denoiser (what pipe.<denoiser_attr> was)
    model: torch.nn.Module             # what the graphs are cut from: the denoiser, or it with its ControlNets
    wrapper: DeepCacheDenoiser
    runner: object
    backend: str
    config: DeepCacheConfig
    cut: dict
    original_class: type
    info: dict
    bakes_weights: bool                # whether the runner holds copies of the weights (engines, frozen graphs)
    restore_extras: object = None      # undoes what the family did besides the denoiser (ControlNet calls)
    released: bool = False             # enable(release_weights=True): the denoiser's weights were freed
    settings: dict = field(default_factory=dict)  # family.graph_settings the graphs were made with (FreeU)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def graphs(self) -> dict[str, torch.nn.Module]:
        return dict(zip(GRAPHS, self.family.split(self.model, self.cut)))

    def refit(self) -> float:
        """Give the runner the denoiser's current weights (after a LoRA change). Returns the seconds it took."""
        seconds = self.runner.refit(self.graphs())
        self.runner.weights_fingerprint = weights_fingerprint(self.model, values=self.bakes_weights)
        return seconds

    def check_weights(self) -> None:
        """Refit if the denoiser's weights or graph settings (FreeU) changed since the runner took them; raise if
        the runner cannot."""
        settings = self.family.graph_settings(self.model)
        if settings != self.settings:
            self._take_settings(settings)
            return
        if self.released:  # the engine holds the only copy of the weights; nothing can change them
            return
        now = weights_fingerprint(self.model, values=self.bakes_weights)
        if fingerprints_equal(now, self.runner.weights_fingerprint):
            return
        specs = self.info.get("specs")
        engine_dtype = specs["full"].inputs[0].dtype if specs and self.runner.static_shapes is not None else None
        if engine_dtype is not None and dtype_name(self.denoiser.dtype) != engine_dtype:
            raise EngineError(
                f"the {self.family.denoiser_attr} is now {dtype_name(self.denoiser.dtype)}, and the {self.backend} "
                f"graphs were built for {engine_dtype}: dcaccel.disable(pipe), then enable it again with an engine "
                f"for {dtype_name(self.denoiser.dtype)} (or move the pipeline back to {engine_dtype})")
        try:
            seconds = self.refit()
        except (EngineError, RuntimeError, ValueError) as e:
            raise EngineError(
                f"the {self.family.denoiser_attr}'s weights changed after dcaccel.enable, and the {self.backend} graphs "
                f"cannot take the new ones ({e}); dcaccel.disable(pipe) and enable it again (with a new build)") from e
        if self.bakes_weights:
            logger.warning("the %s's weights changed after dcaccel.enable: %s graphs refitted in %.2f s",
                           self.family.denoiser_attr, self.backend, seconds)

    def _take_settings(self, settings: dict) -> None:
        changed = ", ".join(f"{k} {self.settings.get(k)} -> {v}" for k, v in settings.items()
                            if self.settings.get(k) != v)
        inputs = self.family.inputs_changed(self.settings, settings)
        if inputs is not None:
            raise EngineError(
                f"the {self.family.denoiser_attr} changed after dcaccel.enable in a way that changes the graphs' "
                f"inputs ({inputs}): dcaccel.disable(pipe), then dcaccel.enable(pipe, ...) again")
        if not getattr(self.runner, "follows_settings", False):
            raise EngineError(
                f"the {self.family.denoiser_attr}'s settings changed after dcaccel.enable ({changed}), and the "
                f"{self.backend} graphs were built with the old ones (constants of the engine): set them back, or "
                "dcaccel.disable(pipe) and enable it again with an engine built for the new ones")
        seconds = self.refit()
        self.settings = settings
        logger.info("the %s's settings changed (%s): %s graphs made again in %.2f s", self.family.denoiser_attr,
                    changed, self.backend, seconds)


def enabled_state(pipe) -> EnabledState | None:
    """The state of an enabled pipeline (its original denoiser, runner, backend, config), or None."""
    return pipe.__dict__.get(_STATE)


def _enabled_class(cls: type, attr: str) -> type:
    """The subclass of the pipeline's class that an enabled pipeline wears (see the module's docstring)."""
    if cls in _CLASSES:
        return _CLASSES[cls]

    def __call__(self, *args, **kwargs):
        state = enabled_state(self)
        if state is None:
            return cls.__call__(self, *args, **kwargs)
        if state.wrapper._owner_thread == threading.get_ident():
            raise RuntimeError("this pipeline is already running a call in this thread; a DeepCache pipeline cannot "
                               "be called from inside its own call")
        state.family.check_call(kwargs, state.runner)
        with state.lock:
            state.check_weights()
            state.wrapper.begin_call()
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                state.wrapper.end_call()

    def components(self):
        comps = cls.components.fget(self)
        state = enabled_state(self)
        if state is not None and attr in comps:
            comps[attr] = state.denoiser
        return comps

    def __setattr__(self, name, value):
        state = enabled_state(self)
        if state is not None and (name == attr or (name == "controlnet" and state.family.name == "controlnet")):
            raise RuntimeError(f"DeepCache is enabled on this pipeline: dcaccel.disable(pipe) before replacing "
                               f"pipe.{name}, then enable it again")
        cls.__setattr__(self, name, value)

    _CLASSES[cls] = type(cls.__name__, (cls,), {
        **_loader_methods(cls), "__call__": __call__, "components": property(components),
        "enable_model_cpu_offload": _refuse_offload, "enable_sequential_cpu_offload": _refuse_offload,
        "__setattr__": __setattr__, "__module__": cls.__module__, "_dcaccel_enabled_class": True})
    return _CLASSES[cls]


@contextlib.contextmanager
def _original_denoiser(pipe, state: EnabledState):
    """pipe.<denoiser> is the original denoiser inside the block (for diffusers' loaders and savers)."""
    attr = state.family.denoiser_attr
    before = pipe.__dict__[attr]
    pipe.__dict__[attr] = state.denoiser
    try:
        yield
    finally:
        pipe.__dict__[attr] = before


# Loader methods that read or write the denoiser's weights (refused once they are released); the others (prompt
# conversion for textual inversion, set_ip_adapter_scale, ...) run.
_WRITES_WEIGHTS = ("load_", "fuse_", "unfuse_", "unload_", "save_", "set_adapters", "delete_adapters",
                   "enable_lora", "disable_lora")


def _with_original_denoiser(method):
    """A pipeline method (diffusers' LoRA, textual inversion, ... loaders) run with the original denoiser in place
    of the step loop, one at a time with the pipeline's calls. The step loop sees what changed at the next call
    (see EnabledState.check_weights)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        state = enabled_state(self)
        if state is None:
            return method(self, *args, **kwargs)
        name = method.__name__
        if state.released and name.startswith(_WRITES_WEIGHTS) and "textual_inversion" not in name:
            raise RuntimeError(f"{method.__name__}: the {state.family.denoiser_attr}'s weights were released by "
                               "dcaccel.enable(..., release_weights=True) (the engine holds the only copy), so they "
                               "cannot be read, changed or loaded into; save or change the pipeline before enabling "
                               "it, or load it again without release_weights")
        with state.lock, _original_denoiser(self, state):
            return method(self, *args, **kwargs)

    return run


def _loader_methods(cls: type) -> dict:
    """The instance methods the pipeline's class has from diffusers' loader mixins, and save_pretrained."""
    out = {"save_pretrained": _with_original_denoiser(cls.save_pretrained)}
    for base in cls.__mro__:
        if not base.__module__.startswith("diffusers.loaders"):
            continue
        for name, value in vars(base).items():
            if name.startswith("_") or name in out or not inspect.isfunction(value):
                continue
            out[name] = _with_original_denoiser(getattr(cls, name))
    return out


def _num_evaluations(pipe) -> int:
    """Denoiser evaluations in the current call: the pipelines set _num_timesteps just before their loop."""
    n = getattr(pipe, "_num_timesteps", None)
    if n:
        return int(n)
    sched = pipe.scheduler
    return len(sched.timesteps) - int(getattr(sched, "begin_index", None) or 0)


def enable(pipe, config: DeepCacheConfig | None = None, backend: str = "eager", release_weights: bool = False,
           **options):
    """Run `pipe`'s denoiser as DeepCache's full/shallow graphs on `backend`. Returns `pipe`.

    Options go to the engine layer and the backend: engine_dir=... (a build), or height=, width= (batch_size=,
    cfg=, dtype=) to build for those shapes now, and the backend's own options (see its Options class).

    release_weights=True (onnxruntime, tensorrt): free the denoiser's own weights, which the engine holds a copy
    of, so host memory holds the model once: freed once the engine is built (if built now) and checked against the
    pipeline, just before its files are loaded, so that the two copies never coexist at load. Should the load
    then fail, the error says the weights are gone. The price: the weights cannot change while
    enabled (LoRA loaders are refused), and after disable() the denoiser cannot run (a clear error says so): load
    the pipeline again to use it without DeepCache.
    """
    if not isinstance(release_weights, bool):
        raise ValueError(f"release_weights must be True or False, got {release_weights!r}")
    if release_weights and backend not in RELEASES_WEIGHTS:
        raise ValueError(f"release_weights=True needs an engine that holds its own copy of the weights "
                         f"(backend {' or '.join(RELEASES_WEIGHTS)}); backend {backend!r} computes with the "
                         "denoiser's own weights")
    config = config or DeepCacheConfig()
    if not isinstance(config, DeepCacheConfig):
        raise TypeError(f"config must be a dcaccel.DeepCacheConfig, got {type(config).__name__}")
    if release_weights and config.schedule == "dynamic":
        raise ValueError("release_weights=True cannot go with schedule='dynamic': its probe runs on the denoiser's "
                         "own weights every step")
    family = family_of_pipeline(pipe)
    config = family.resolve_config(config)
    if enabled_state(pipe) is not None:
        raise RuntimeError("DeepCache is already enabled on this pipeline; call dcaccel.disable(pipe) first")
    denoiser = getattr(pipe, family.denoiser_attr)
    if isinstance(denoiser, DeepCacheDenoiser):
        raise RuntimeError(f"pipe.{family.denoiser_attr} is the DeepCache step loop of another pipeline; make this "
                           f"pipeline from that one's `components` (the original {family.denoiser_attr})")
    if getattr(denoiser, "_hf_hook", None) is not None or getattr(pipe, "_all_hooks", None):
        raise ValueError(f"this pipeline has accelerate's offload hooks ({_OFFLOAD}): {_OFFLOAD_WHY}. Call "
                         "pipe.remove_all_hooks() and pipe.to(device) before dcaccel.enable")
    freed, checks = [], {}

    def release():  # once the engine is checked against the pipeline, before its files load: one copy at a time
        model = family.denoiser(pipe)
        # what attach checks against the weights (a calibration's weights hash) is checked while they exist
        checks["calibration"] = calibration_check(pipe, family, model, family.resolve_cut(model, config), config)
        freed.append(release_denoiser_weights(model, [denoiser, *getattr(model, "controlnets", [])],
                                              family.denoiser_attr))

    runner = None
    try:
        runner, info = open_runner(pipe, config, backend, before_load=release if release_weights else None,
                                   **options)
        attach(pipe, config, backend, runner, info,
               **({"_calibration_check": checks["calibration"]} if freed else {}))
    except Exception as e:
        if runner is not None and enabled_state(pipe) is None and hasattr(runner, "close"):
            runner.close()
        if freed:
            raise EngineError(f"{e} (the {family.denoiser_attr}'s weights were already released by "
                              "release_weights=True, just before the engine's files were loaded: load the pipeline "
                              "again)") from e
        raise
    if release_weights:
        enabled_state(pipe).released = True
        logger.info("released %.2f GB of %s weights before loading the %s engine (it holds them)", freed[0] / 1e9,
                    family.denoiser_attr, backend)
    return pipe


RELEASES_WEIGHTS = ("onnxruntime", "tensorrt")


def release_denoiser_weights(model: torch.nn.Module, callable_modules: list, name: str) -> int:
    """Free the storage of `model`'s parameters (each becomes an empty tensor of its dtype and device, so the
    pipeline still reads the denoiser's dtype and device) and make any later call of `callable_modules` (the
    pipeline's denoiser, its ControlNets) outside the step loop fail clearly. Returns the bytes released."""
    freed = 0
    with torch.no_grad():
        for p in model.parameters():
            freed += p.numel() * p.element_size()
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def refuse(module, args):
        if getattr(type(module), "_dcaccel_hands_over", False):  # a ControlNet inside the enabled step loop
            return
        raise RuntimeError(f"this {name}'s weights were released by dcaccel.enable(..., release_weights=True) (an "
                           "engine held the only copy); load the pipeline again to run it without DeepCache")

    for module in callable_modules:
        setattr(module, RELEASED, True)
        module.register_forward_pre_hook(refuse)
    return freed


_OFFLOAD = "enable_model_cpu_offload / enable_sequential_cpu_offload"
_OFFLOAD_WHY = ("DeepCache's graphs run the denoiser's blocks directly, so hooks on the denoiser's forward never "
                "fire and its weights would not be moved to the accelerator")


def _refuse_offload(self, *args, **kwargs):
    raise ValueError(f"DeepCache is enabled on this pipeline: CPU offload ({_OFFLOAD}) is not supported with it "
                     f"({_OFFLOAD_WHY}). Keep the pipeline on its device, or dcaccel.disable(pipe) first")


_UNSET = object()


def attach(pipe, config: DeepCacheConfig, backend: str, runner, info: dict, _calibration_check=_UNSET):
    """Put a runner made by engines.open_runner for this pipeline into it (what enable does after opening it).
    A runner kept from an earlier attach may be attached again (the benchmark does, to interleave backends
    without rebuilding them); the weights check at each call still guards it."""
    family = family_of_pipeline(pipe)
    config = family.resolve_config(config)
    if enabled_state(pipe) is not None:
        raise RuntimeError("DeepCache is already enabled on this pipeline; call dcaccel.disable(pipe) first")
    denoiser = getattr(pipe, family.denoiser_attr)
    model = family.denoiser(pipe)
    cut = info["cut"]
    if family.resolve_cut(model, config) != cut:
        raise ValueError(f"the runner was made for {family.cut_text(cut)}, the config asks for "
                         f"{family.cut_text(family.resolve_cut(model, config))}")
    sync = torch.cuda.synchronize if denoiser.device.type == "cuda" else None
    wrapper = DeepCacheDenoiser(model, family, runner, config, lambda: _num_evaluations(pipe), sync=sync,
                                original=denoiser,
                                check_call=(calibration_check(pipe, family, model, cut, config)
                                            if _calibration_check is _UNSET else _calibration_check),
                                probe=family.probe(model, cut) if config.schedule == "dynamic" else None)
    bakes = backend != "eager" and not (backend == "torch_compile" and not getattr(runner, "freezing", True))
    state = EnabledState(family=family, denoiser=denoiser, model=model, wrapper=wrapper, runner=runner,
                         backend=backend, config=config, cut=cut, original_class=type(pipe), info=info,
                         bakes_weights=bakes, settings=family.graph_settings(model))
    if getattr(runner, "weights_fingerprint", None) is None:  # a runner kept from an earlier attach has its own
        runner.weights_fingerprint = weights_fingerprint(model, values=bakes)
    state.restore_extras = family.attach_extras(pipe, wrapper)
    # Set through __dict__: DiffusionPipeline.__setattr__ would rewrite the pipeline's config for the denoiser.
    pipe.__dict__[family.denoiser_attr] = wrapper
    pipe.__class__ = _enabled_class(type(pipe), family.denoiser_attr)
    pipe.__dict__[_STATE] = state
    logger.info("DeepCache enabled: %s, %s, backend=%s", config, family.cut_text(cut), backend)
    return pipe


def calibration_check(pipe, family, model, cut: dict, config: DeepCacheConfig):
    """A calibrated schedule: refuse a calibration made for another model, cut or scheduler now (naming every
    field), and return the check of each call's evaluations and guidance (None for other schedules)."""
    if config.schedule != "calibrated":
        return None
    cal, fallback = config.calibration, config.calibration_fallback
    cal.check_pipeline(pipe, family, model, cut, fallback)
    return lambda n: cal.check_call(n, getattr(pipe, "_guidance_scale", None), fallback)


def disable(pipe, close: bool = True):
    """Give back the exact original pipeline: its own denoiser object and class. close=False keeps the runner
    usable for a later attach()."""
    state = enabled_state(pipe)
    if state is None:
        raise RuntimeError("DeepCache is not enabled on this pipeline (dcaccel.enable was not called, or it was "
                           "already disabled)")
    with state.lock:
        del pipe.__dict__[_STATE]
        pipe.__dict__[state.family.denoiser_attr] = state.denoiser
        pipe.__class__ = state.original_class
        state.restore_extras()
        state.wrapper.detach()
        if close:
            state.runner.close()
    logger.info("DeepCache disabled")
    return pipe


def is_enabled(pipe) -> bool:
    return enabled_state(pipe) is not None


def last_stats(pipe):
    """StepStats of the last call of an enabled pipeline: full/shallow steps and their graph times."""
    state = enabled_state(pipe)
    if state is None:
        raise RuntimeError("DeepCache is not enabled on this pipeline")
    return state.wrapper.stats
