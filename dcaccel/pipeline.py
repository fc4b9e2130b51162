"""enable(pipe, ...) / disable(pipe): plug the DeepCache step loop into a diffusers pipeline, and take it out."""

from __future__ import annotations

import logging

import torch

from .backends import get_backend
from .config import DeepCacheConfig
from .runtime import DeepCacheUNet
from .split import check_unet, num_branches

logger = logging.getLogger(__name__)

SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)
_STATE = "_dcaccel_state"
_CALL_CLASSES: dict[type, type] = {}


def _check_pipeline(pipe) -> None:
    import diffusers

    classes = tuple(getattr(diffusers, name) for name in SUPPORTED_PIPELINES)
    if not isinstance(pipe, classes):
        raise TypeError(f"unsupported pipeline {type(pipe).__name__}; dcaccel supports {list(SUPPORTED_PIPELINES)}")


def _call_resetting_class(cls: type) -> type:
    """A subclass of the pipeline's class whose __call__ resets the step loop first, so that no feature or step
    count survives from one call to the next. disable() puts the original class back."""
    if cls not in _CALL_CLASSES:
        def __call__(self, *args, **kwargs):
            self.unet.reset()
            return cls.__call__(self, *args, **kwargs)

        _CALL_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                          "_dcaccel_call_class": True})
    return _CALL_CLASSES[cls]


def _num_evaluations(pipe) -> int:
    """U-Net evaluations in the current call: the pipelines set _num_timesteps just before their loop."""
    n = getattr(pipe, "_num_timesteps", None)
    if n:
        return int(n)
    sched = pipe.scheduler
    return len(sched.timesteps) - int(getattr(sched, "begin_index", None) or 0)


def enable(pipe, config: DeepCacheConfig | None = None, backend: str = "eager", **options):
    """Run `pipe`'s U-Net as DeepCache's full/shallow graphs on `backend`. Returns `pipe`.

    Options go to the backend (for engine backends: engine_dir, or height/width/batch_size to build in memory).
    """
    config = config or DeepCacheConfig()
    if not isinstance(config, DeepCacheConfig):
        raise TypeError(f"config must be a dcaccel.DeepCacheConfig, got {type(config).__name__}")
    _check_pipeline(pipe)
    if hasattr(pipe, _STATE):
        raise RuntimeError("DeepCache is already enabled on this pipeline; call dcaccel.disable(pipe) first")
    unet = pipe.unet
    check_unet(unet)
    n = num_branches(unet)
    if not 0 <= config.branch < n:
        raise ValueError(f"branch must be in 0..{n - 1} for this U-Net ({n // 3} blocks), got {config.branch}")
    runner = get_backend(backend).create_runner(unet, config.branch, pipe=pipe, **options)
    sync = torch.cuda.synchronize if unet.device.type == "cuda" else None
    wrapper = DeepCacheUNet(unet, runner, config, lambda: _num_evaluations(pipe), sync=sync)
    original_class = type(pipe)
    # Set through __dict__: DiffusionPipeline.__setattr__ would rewrite the pipeline's config for `unet`.
    pipe.__dict__["unet"] = wrapper
    pipe.__class__ = _call_resetting_class(original_class)
    pipe.__dict__[_STATE] = {"unet": unet, "class": original_class, "backend": backend, "config": config}
    logger.info("DeepCache enabled: %s, backend=%s", config, backend)
    return pipe


def disable(pipe):
    """Give back the exact original pipeline: its own U-Net object and class."""
    state = pipe.__dict__.pop(_STATE, None)
    if state is None:
        raise RuntimeError("DeepCache is not enabled on this pipeline (dcaccel.enable was not called, or it was "
                           "already disabled)")
    pipe.__dict__["unet"] = state["unet"]
    pipe.__class__ = state["class"]
    logger.info("DeepCache disabled")
    return pipe


def is_enabled(pipe) -> bool:
    return hasattr(pipe, _STATE)


def last_stats(pipe):
    """StepStats of the last call of an enabled pipeline: full/shallow steps and their graph times."""
    if not is_enabled(pipe):
        raise RuntimeError("DeepCache is not enabled on this pipeline")
    return pipe.unet.stats
