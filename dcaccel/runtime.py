"""The step loop: per U-Net evaluation, run the full or the shallow graph and hand the feature over.

DeepCacheUNet stands in for the pipeline's U-Net. It counts evaluations within one pipeline call (reset at the
start of every call, see pipeline.py), so it never looks a step up by timestep value and keeps nothing from one
call to the next.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .config import DeepCacheConfig
from .schedule import full_step_mask

logger = logging.getLogger(__name__)

_UNSUPPORTED_KWARGS = (
    "class_labels", "timestep_cond", "attention_mask", "down_block_additional_residuals",
    "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask",
)


class StepStats:
    """What the last pipeline call ran: which evaluations were full, and the time spent in each graph."""

    def __init__(self):
        self.full_steps: list[int] = []
        self.shallow_steps: list[int] = []
        self.full_seconds: list[float] = []
        self.shallow_seconds: list[float] = []

    @property
    def unet_seconds(self) -> float:
        return sum(self.full_seconds) + sum(self.shallow_seconds)


class UNetTimer:
    """Times the calls of a plain (not DeepCache) U-Net with forward hooks, removed by close() or at the end of a
    `with` block: the no-cache counterpart of StepStats.unet_seconds."""

    def __init__(self, unet):
        self.seconds = 0.0
        self.calls = 0
        self._sync = torch.cuda.synchronize if unet.device.type == "cuda" else (lambda: None)
        self._handles = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

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


class DeepCacheUNet(nn.Module):
    """Takes the U-Net's place in a pipeline and runs the DeepCache step loop on a backend's runner.

    Attributes the pipeline reads from its U-Net (config, dtype, add_embedding, ...) come from the original.
    """

    def __init__(self, unet, runner, config: DeepCacheConfig, num_steps_fn, sync=None):
        super().__init__()
        self.unet = unet
        self.runner = runner
        self.deepcache_config = config
        self._num_steps_fn = num_steps_fn
        self._sync = sync or (lambda: None)
        self.reset()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def reset(self) -> None:
        """Forget everything from the previous call: the next evaluation is step 0, a full step."""
        self._step = 0
        self._mask: list[bool] | None = None
        self.stats = StepStats()

    def forward(self, sample, timestep, encoder_hidden_states=None, *, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict=True, **kwargs):
        bad = [k for k in kwargs if k not in _UNSUPPORTED_KWARGS]
        if bad:
            raise TypeError(f"unexpected U-Net arguments {bad}")
        used = sorted(k for k in kwargs if kwargs[k] is not None)
        if used:
            raise ValueError(f"dcaccel does not support the U-Net arguments {used} (ControlNet, adapters, masks, "
                             "LCM-distilled timestep_cond); disable DeepCache for such pipelines")
        if cross_attention_kwargs:
            raise ValueError(f"cross_attention_kwargs {sorted(cross_attention_kwargs)} are not supported: fuse LoRA "
                             "scales into the weights (dcaccel.lora) instead of passing them per call")
        if self._mask is None:
            n = self._num_steps_fn()
            self._mask = full_step_mask(self.deepcache_config, n)
            logger.debug("DeepCache call: %d evaluations, full at %s", n, [i for i, f in enumerate(self._mask) if f])
        step = self._step
        self._step += 1
        full = step >= len(self._mask) or self._mask[step]
        if step == len(self._mask):
            logger.warning("more U-Net evaluations than the %d expected; extra ones run the full graph", len(self._mask))

        inputs = self._inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        self._sync()
        start = time.perf_counter()
        noise = self.runner.run_full(inputs) if full else self.runner.run_shallow(inputs)
        self._sync()
        elapsed = time.perf_counter() - start
        (self.stats.full_steps if full else self.stats.shallow_steps).append(step)
        (self.stats.full_seconds if full else self.stats.shallow_seconds).append(elapsed)
        logger.debug("step %d: %s graph, %.4f s", step, "full" if full else "shallow", elapsed)
        if not return_dict:
            return (noise,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise)

    def _inputs(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        # Timesteps become float32 of shape (batch,), as the U-Net's time projection computes them; made the
        # same way on every call so that a compiled graph never sees a new kind of tensor.
        t = torch.as_tensor(timestep, device=sample.device).to(torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        inputs = {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states}
        if self.unet.config.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError("an SDXL U-Net needs added_cond_kwargs with text_embeds and time_ids")
            inputs["text_embeds"] = added_cond_kwargs["text_embeds"]
            inputs["time_ids"] = added_cond_kwargs["time_ids"]
        return inputs
