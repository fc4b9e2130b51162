"""Timing of pipeline calls: the step loop's own StepStats for dcaccel, forward hooks for everything else."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..runtime import StepStats


class HookTimer:
    """Times each evaluation of a pipeline's own denoiser (plain diffusers or a peer's hooks) into StepStats.
    An evaluation counts as full when `deep` (a module only a full step runs: the U-Net's mid block, the first
    middle block of a transformer) ran. `before`: modules a step runs before the denoiser (a ControlNet
    pipeline's ControlNet), timed as part of the step, as dcaccel's fused graphs include them."""

    def __init__(self, denoiser, deep: torch.nn.Module, sync, before=()):
        self._denoiser, self._deep_module, self._sync = denoiser, deep, sync
        self._before = list(before)
        self._handles = []
        self.reset()

    def reset(self):
        self.stats = StepStats()
        self._step = 0
        self._start = None

    def take(self) -> StepStats:
        """The StepStats of the last call; starts counting afresh for the next."""
        stats = self.stats
        self.reset()
        return stats

    def __enter__(self):
        self.reset()
        self._handles = [self._denoiser.register_forward_pre_hook(self._pre),
                         self._denoiser.register_forward_hook(self._post),
                         self._deep_module.register_forward_hook(self._deep)]
        self._handles += [m.register_forward_pre_hook(self._pre) for m in self._before]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _pre(self, module, args):
        if self._start is not None:  # the step began with a module in `before`
            return
        self._sync()
        self._deep_ran = False
        self._start = time.perf_counter()

    def _deep(self, module, args, output):
        self._deep_ran = True

    def _post(self, module, args, output):
        self._sync()
        elapsed = time.perf_counter() - self._start
        self._start = None
        full = self._deep_ran
        (self.stats.full_steps if full else self.stats.shallow_steps).append(self._step)
        (self.stats.full_seconds if full else self.stats.shallow_seconds).append(elapsed)
        self._step += 1


@dataclass
class Measurement:
    """One configuration at one step count: the untimed first call's latents and schedule, then the timings of
    the timed calls (one per round, rounds interleaved with the other configurations)."""

    latents: torch.Tensor | None = None
    pipeline_seconds: list[float] = field(default_factory=list)
    denoiser_seconds: list[float] = field(default_factory=list)
    full_seconds: list[float] = field(default_factory=list)
    shallow_seconds: list[float] = field(default_factory=list)
    full_steps: list[int] = field(default_factory=list)
    num_evaluations: int = 0
    peak_mb: float | None = None
    peak_total_mb: float | None = None
    not_timed: str | None = None
    output: object = None  # fidelity.Output of the first call

    def add(self, seconds: float, stats: StepStats) -> None:
        self.pipeline_seconds.append(seconds)
        self.denoiser_seconds.append(stats.denoiser_seconds)
        self.full_seconds += stats.full_seconds
        self.shallow_seconds += stats.shallow_seconds
        self.full_steps = list(stats.full_steps)
        self.num_evaluations = len(stats.full_steps) + len(stats.shallow_steps)


def timed(call, take_stats) -> tuple[torch.Tensor, float, StepStats]:
    start = time.perf_counter()
    latents = call()
    return latents, time.perf_counter() - start, take_stats()


def median(xs):
    return float(statistics.median(xs)) if xs else None


def p90(xs):
    return float(np.percentile(xs, 90)) if xs else None


def ratio(a, b):
    return a / b if a is not None and b else None
