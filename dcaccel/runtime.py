"""The step loop: per denoiser evaluation, run the full or the shallow graph and hand the cache over.

DeepCacheDenoiser stands in for the pipeline's denoiser (its `unet` or `transformer`). It counts evaluations
within one pipeline call (reset at the start of every call, see pipeline.py), so it never looks a step up by
timestep value and keeps nothing from one call to the next. The model family turns the pipeline's call into graph
inputs and the noise back into what the denoiser would have returned; the loop itself knows no family.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from torch import nn

from .config import DeepCacheConfig
from .policies import policy_for

logger = logging.getLogger(__name__)


class StepStats:
    """What the last pipeline call ran: which evaluations were full, and the time spent in each graph."""

    def __init__(self):
        self.full_steps: list[int] = []
        self.shallow_steps: list[int] = []
        self.full_seconds: list[float] = []
        self.shallow_seconds: list[float] = []
        self.extra: list[tuple[int, str, float]] = []  # evaluations outside the schedule: (step, what, seconds)

    @property
    def denoiser_seconds(self) -> float:
        return sum(self.full_seconds) + sum(self.shallow_seconds) + sum(s for _, _, s in self.extra)

    unet_seconds = denoiser_seconds  # the U-Net name, kept for scripts written against it


class DenoiserTimer:
    """Times the calls of a plain (not DeepCache) denoiser with forward hooks, removed by close() or at the end of
    a `with` block: the no-cache counterpart of StepStats.denoiser_seconds."""

    def __init__(self, denoiser):
        self.seconds = 0.0
        self.calls = 0
        self._sync = torch.cuda.synchronize if denoiser.device.type == "cuda" else (lambda: None)
        self._handles = [denoiser.register_forward_pre_hook(self._pre), denoiser.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self._sync()
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def close(self):
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



class DeepCacheDenoiser(nn.Module):
    """Takes the denoiser's place in a pipeline and runs the DeepCache step loop on a backend's runner.

    Attributes the pipeline reads from its denoiser (config, dtype, add_embedding, ...) and its weights
    (state_dict, load_state_dict, parameters) are the original's. It runs only inside a call of the pipeline it
    was enabled on (pipeline.py marks those); after dcaccel.disable it is detached and runs the original denoiser
    as it is, so a pipeline that kept a reference to it is never left running DeepCache.
    """

    def __init__(self, denoiser, family, runner, config: DeepCacheConfig, num_steps_fn, sync=None, original=None,
                 check_call=None, probe=None):
        """`denoiser`: the model the graphs were cut from; `original`: the pipeline attribute it stands in for
        (the same module, except where a family joins more models to the denoiser, e.g. ControlNets);
        `check_call(num_evaluations)`: run at the first evaluation of every call (a calibration's call-time
        checks)."""
        super().__init__()
        self.denoiser = denoiser
        self.original = denoiser if original is None else original
        self.pending_control = None
        self.family = family
        self.runner = runner
        self.deepcache_config = config
        self._num_steps_fn = num_steps_fn
        self._check_call = check_call
        self.policy = policy_for(config, probe)
        self._sync = sync or (lambda: None)
        self._owner_thread: int | None = None
        self._detached = False
        self.reset()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)

    @property
    def __class__(self):
        """The original denoiser's class, to code that asks: `isinstance(pipe.unet, UNet2DConditionModel)` (and
        `pipe.unet.__class__.__name__`) stay what they were before enable, as diffusers' pipelines and users'
        scripts branch on them; isinstance also answers True for DeepCacheDenoiser, and `type()` is this class.
        What such code then calls (methods, config, weights) reaches the original through __getattr__."""
        return type(self._modules["original"])

    def _get_name(self) -> str:  # repr(pipe.unet) says what it is
        return "DeepCacheDenoiser"

    # The weights are the original denoiser's, under its own names.
    def state_dict(self, *args, **kwargs):
        return self._modules["original"].state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self._modules["original"].load_state_dict(*args, **kwargs)

    def named_parameters(self, *args, **kwargs):
        return self._modules["original"].named_parameters(*args, **kwargs)

    def named_buffers(self, *args, **kwargs):
        return self._modules["original"].named_buffers(*args, **kwargs)

    def reset(self) -> None:
        """Forget everything from the previous call: the next evaluation is step 0, a full step."""
        self._step = 0
        self._started = False
        self.stats = StepStats()

    def begin_call(self) -> None:
        self.reset()
        self._owner_thread = threading.get_ident()

    def end_call(self) -> None:
        self._owner_thread = None

    def detach(self) -> None:
        self._detached = True

    def forward(self, *args, **kwargs):
        if self._detached:
            return self._modules["original"](*args, **kwargs)
        if self._owner_thread != threading.get_ident():
            raise RuntimeError(
                f"this {self.family.denoiser_attr} is dcaccel's DeepCache step loop of another pipeline: it runs only "
                "inside that pipeline's calls. Make other pipelines from `pipe.components` (which hold the original "
                f"{self.family.denoiser_attr}) and call dcaccel.enable on them")
        return_dict = kwargs.get("return_dict", True)
        inputs = self.family.call_inputs(self._modules["denoiser"], args, kwargs, self)
        extra = inputs.pop("extra", None)
        if extra is not None:
            return self.family.output(self._extra_evaluation(extra, inputs), return_dict)
        if not self._started:
            n = self._num_steps_fn()
            if self._check_call is not None:
                self._check_call(n)
            self.policy.begin(n)
            self._started = True
        step = self._step
        self._step += 1
        self._sync()
        start = time.perf_counter()
        noise, full = self.policy.run(step, inputs, self.runner)
        self._sync()
        elapsed = time.perf_counter() - start
        (self.stats.full_steps if full else self.stats.shallow_steps).append(step)
        (self.stats.full_seconds if full else self.stats.shallow_seconds).append(elapsed)
        logger.debug("step %d: %s graph, %.4f s", step, "full" if full else "shallow", elapsed)
        return self.family.output(noise, return_dict)

    def _extra_evaluation(self, extra, inputs) -> torch.Tensor:
        """An evaluation the pipeline adds to a step (SD 3.5's skip-layer guidance): its own graph, run in full
        after the step's evaluation, outside the schedule (not a step; the cache neither read nor written)."""
        key, make = extra
        run = getattr(self.runner, "run_extra", None)
        if run is None:  # the family's check_call refuses such calls before the pipeline runs
            raise RuntimeError(f"the {type(self.runner).__name__} runs no graph but the full and shallow ones: {key[0]} "
                               "needs the eager or torch_compile backend")
        self._sync()
        start = time.perf_counter()
        noise = run(key, make, inputs)
        self._sync()
        elapsed = time.perf_counter() - start
        self.stats.extra.append((self._step - 1, key[0], elapsed))
        logger.debug("step %d: %s graph, %.4f s", self._step - 1, key[0], elapsed)
        return noise

