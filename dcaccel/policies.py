"""Schedule policies: what the step loop asks at every denoiser evaluation ("full or shallow? what goes into the
cache buffers?"). Chosen by name from POLICIES (policy_for picks the one a DeepCacheConfig asks for); a policy's
state is reset by begin() at the start of every pipeline call, so nothing survives from one call to the next.

    static    the full steps of dcaccel.schedule.full_steps (uniform, non-uniform, explicit, calibrated); a cached
              step reads the feature the last full step left in the buffers
    forecast  the same full steps; a cached step reads the feature extrapolated from the last 2 (order 1) or 3
              (order 2) full steps, written into the runner's own cache buffers (TaylorSeer's idea, on every
              backend: the buffers are what every runner's shallow graph reads). Measured against the calibrated
              schedules it does not move the quality/speed front (README, "Forecasting"), so no DeepCacheConfig
              field selects it: experiments install it with use_policy(pipe, ForecastPolicy(config, order))
    dynamic   SD 3 transformers: a probe of the first blocks decides per evaluation, for the whole batch, whether
              the shallow graph may run (cache-dit's DBCache rule with static graphs)
    record    calibration only (dcaccel.calibration): every step is full, and the shallow graph is also run on the
              features of earlier full steps to measure what caching would have cost

A policy's run(step, inputs, runner) returns (noise, full).
"""

from __future__ import annotations

import logging

import torch

from .config import DeepCacheConfig
from .schedule import full_step_mask

logger = logging.getLogger(__name__)


class StaticPolicy:
    name = "static"

    def __init__(self, config: DeepCacheConfig):
        self.config = config
        self.mask: list[bool] = []

    def begin(self, num_steps: int) -> None:
        self.mask = full_step_mask(self.config, num_steps)
        logger.debug("%s policy: %d evaluations, full at %s", self.name, num_steps,
                     [i for i, f in enumerate(self.mask) if f])

    def is_full(self, step: int) -> bool:
        if step == len(self.mask):
            logger.warning("more denoiser evaluations than the %d expected; extra ones run the full graph",
                           len(self.mask))
        return step >= len(self.mask) or self.mask[step]

    def run(self, step: int, inputs: dict, runner) -> tuple[torch.Tensor, bool]:
        if self.is_full(step):
            noise = runner.run_full(inputs)
            self.after_full(step, runner)
            return noise, True
        self.before_shallow(step, runner)
        return runner.run_shallow(inputs), False

    def after_full(self, step: int, runner) -> None:
        pass

    def before_shallow(self, step: int, runner) -> None:
        pass


class ForecastPolicy(StaticPolicy):
    """Static full steps; on a cached step the feature is the Newton polynomial through the last `order` + 1 full
    steps' features (in evaluation index), evaluated at the cached step. With fewer full steps behind it than that,
    the order drops (none: the last feature as it is)."""

    name = "forecast"

    def __init__(self, config: DeepCacheConfig, order: int = 1):
        super().__init__(config)
        if order not in (1, 2):
            raise ValueError(f"forecast order must be 1 or 2, got {order!r}")
        self.order = order
        self.history: list[tuple[int, dict[str, torch.Tensor]]] = []

    def begin(self, num_steps: int) -> None:
        super().begin(num_steps)
        self.history = []

    def after_full(self, step: int, runner) -> None:
        # reuse the oldest history entry's tensors once the window is full: no allocation after the first steps
        if len(self.history) > self.order:
            _, reuse = self.history.pop(0)
            for name, t in runner.cache.items():
                reuse[name].copy_(t)
        else:
            reuse = {name: t.clone() for name, t in runner.cache.items()}
        self.history.append((step, reuse))

    def before_shallow(self, step: int, runner) -> None:
        if len(self.history) < 2:
            return  # one full step behind: the buffers hold its feature, as without forecasting
        xs = [float(s) for s, _ in self.history]
        weights = lagrange_weights(xs, float(step))
        with torch.no_grad():
            for name, buf in runner.cache.items():
                buf.zero_()
                for w, (_, feats) in zip(weights, self.history):
                    buf.add_(feats[name], alpha=w)


def lagrange_weights(xs: list[float], x: float) -> list[float]:
    """Weights w_i with p(x) = sum w_i y_i for the polynomial p through (xs[i], y_i): lagrange_weights([0, 1], 2)
    == [-1, 2] (linear extrapolation)."""
    out = []
    for i, xi in enumerate(xs):
        w = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                w *= (x - xj) / (xi - xj)
        out.append(w)
    return out


class RecordPolicy:
    """Calibration: every evaluation runs the full graph (so the call's output is the uncached one); then, for each
    of the last `max_gap` full steps i, the shallow graph runs on step i's feature, and the relative L2 distance of
    its noise to the full graph's (per image) is added to errors[i][step]."""

    name = "record"

    def __init__(self, num_steps: int, max_gap: int):
        self.num_steps, self.max_gap = num_steps, max_gap
        self.shallow_calls = 0
        self.errors = torch.zeros(num_steps, num_steps, dtype=torch.float64)  # summed over images
        self.counts = torch.zeros(num_steps, num_steps, dtype=torch.float64)
        self.history: dict[int, dict[str, torch.Tensor]] = {}

    def begin(self, num_steps: int) -> None:
        if num_steps != self.num_steps:
            raise ValueError(f"the calibration call runs {num_steps} denoiser evaluations, {self.num_steps} were "
                             "expected (the same num_inference_steps and strength on every batch)")
        self.history = {}

    def run(self, step: int, inputs: dict, runner) -> tuple[torch.Tensor, bool]:
        if step >= self.num_steps:
            raise RuntimeError(f"more than the {self.num_steps} denoiser evaluations this calibration expected")
        noise = runner.run_full(inputs).clone()
        self.history[step] = {name: t.clone() for name, t in runner.cache.items()}
        for old in [s for s in self.history if s < step - self.max_gap]:
            del self.history[old]
        ref = noise.float().flatten(1)
        ref_norm = ref.norm(dim=1).clamp_min(1e-12)
        for i in range(max(0, step - self.max_gap), step):
            for name, t in runner.cache.items():
                t.copy_(self.history[i][name])
            shallow = runner.run_shallow(inputs).float().flatten(1)
            self.shallow_calls += 1
            rel = (shallow - ref).norm(dim=1) / ref_norm
            self.errors[i, step] += float(rel.sum())
            self.counts[i, step] += rel.numel()
        for name, t in runner.cache.items():
            t.copy_(self.history[step][name])
        return noise, True


class DynamicPolicy:
    """A batch-wide decision at every evaluation (cache-dit's DBCache rule, with static graphs): a third small graph,
    the probe (the embeddings and the first blocks, eager PyTorch on the model's own weights), runs first; if the
    residual it computes moved by less than `threshold` (mean |probe - probe at the last full step| over mean |probe
    at the last full step|, over the whole batch) the shallow graph runs, else the full graph runs and its probe
    becomes the reference. Evaluations before cache_start (at least step 0) and from cache_end on are full.
    The probe runs on every evaluation, also where the full or shallow graph then recomputes those blocks: its
    cost is added to every step (see README)."""

    name = "dynamic"

    def __init__(self, config: DeepCacheConfig, probe):
        if probe is None:
            raise ValueError("schedule='dynamic' needs a probe of the first blocks, which only the SD 3 transformer "
                             "family has; U-Nets take a uniform, non-uniform, explicit or calibrated schedule")
        self.config, self.probe = config, probe
        self.reference = None
        self.decisions: list[float] = []

    def begin(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.reference = None
        self.decisions = []

    def run(self, step: int, inputs: dict, runner) -> tuple[torch.Tensor, bool]:
        c = self.config
        with torch.no_grad():
            probe = self.probe(**{k: inputs[k] for k in self.probe.input_names})
        forced = step < max(1, c.cache_start) or (c.cache_end is not None and step >= c.cache_end)
        if not forced and self.reference is not None:
            change = float((probe - self.reference).abs().mean() / self.reference.abs().mean().clamp_min(1e-12))
            self.decisions.append(change)
            if change < c.threshold:
                return runner.run_shallow(inputs), False
        self.reference = probe
        return runner.run_full(inputs), True


POLICIES = {"static": StaticPolicy, "forecast": ForecastPolicy, "dynamic": DynamicPolicy}


def policy_for(config: DeepCacheConfig, probe=None):
    """The policy a config asks for: dynamic for schedule='dynamic' (with the family's probe), else static."""
    if config.schedule == "dynamic":
        return DynamicPolicy(config, probe)
    return StaticPolicy(config)


def use_policy(pipe, policy) -> None:
    """Put another policy into an enabled pipeline's step loop (for experiments: forecasting). The next call
    begins it afresh; dcaccel.disable drops it with the step loop."""
    from .pipeline import enabled_state

    state = enabled_state(pipe)
    if state is None:
        raise RuntimeError("DeepCache is not enabled on this pipeline")
    state.wrapper.policy = policy
