"""Pure functions: which U-Net evaluations of a pipeline call run the full graph.

Indices count U-Net evaluations from 0 within one pipeline call (for img2img, from the first evaluated step),
so schedulers that repeat a timestep (PNDM) are handled by position, not by timestep value.
"""

from __future__ import annotations

import math

import numpy as np

from .config import DeepCacheConfig, check_int, check_power


def uniform_full_steps(num_steps: int, interval: int) -> list[int]:
    """Every `interval`-th evaluation, starting at 0: uniform_full_steps(5, 2) == [0, 2, 4]."""
    _check_num_steps(num_steps)
    interval = check_int("interval", interval, 1)
    return list(range(0, num_steps, interval))


def nonuniform_full_steps(num_steps: int, interval: int, center: int | None = None, power: float = 1.4) -> list[int]:
    """The paper's non-uniform schedule: ceil(num_steps / interval) full steps, dense around `center`.

    Points are spaced evenly in x on [-center^(1/p), (num_steps-center)^(1/p)] and mapped by sign(x)|x|^p, so
    full steps crowd near `center` and spread out towards both ends; `p` is lowered by 0.02 until the rounded
    points are distinct and their count fits, as in the reference's research pipelines (which take the power of
    a negative number in complex arithmetic; we use the signed power they intend).
    """
    _check_num_steps(num_steps)
    interval = check_int("interval", interval, 1)
    power = check_power(power)
    n_full = math.ceil(num_steps / interval)
    if n_full >= num_steps or interval == 1:
        return list(range(num_steps))
    if center is None:
        center = round(num_steps * 0.3)  # the paper's 15 of 50
    center = check_int("center", center)
    if not 0 <= center < num_steps:
        raise ValueError(f"center must be in [0, {num_steps - 1}] for {num_steps} steps, got {center}")
    # p goes down in steps of 0.02 from `power` towards 1: at most (MAX_POWER - 1) / 0.02 tries.
    p = power
    while p > 1.0:
        x = np.linspace(-(center ** (1 / p)), (num_steps - center) ** (1 / p), n_full + 1)
        mapped = np.unique((np.sign(x) * np.abs(x) ** p).astype(np.int64))[1:-1] + center
        steps = sorted({0, *(int(s) for s in mapped if 0 <= s < num_steps)})
        if len(steps) == n_full:
            return steps
        p -= 0.02
    # The power law cannot place that many distinct points: fall back to the uniform schedule.
    return uniform_full_steps(num_steps, interval)


def full_steps(config: DeepCacheConfig, num_steps: int) -> list[int]:
    """The sorted full evaluations for `config` over a call of `num_steps` U-Net evaluations. Step 0 is always full."""
    _check_num_steps(num_steps)
    if config.interval is None and config.schedule in ("uniform", "nonuniform"):
        raise ValueError("interval is None (the model family's default): resolve it first with "
                         "family.resolve_config(config), as dcaccel.enable does")
    if config.schedule == "uniform":
        steps = set(uniform_full_steps(num_steps, config.interval))
    elif config.schedule == "nonuniform":
        steps = set(nonuniform_full_steps(num_steps, config.interval, config.center, config.power))
    elif config.schedule == "dynamic":
        raise ValueError("schedule='dynamic' decides at every evaluation of a call (policies.DynamicPolicy): it has "
                         "no full steps to list before the call")
    elif config.schedule == "calibrated":
        steps = set(config.calibration.full_steps_for(num_steps, num_full_steps=config.num_full_steps,
                                                      speedup=config.speedup, fallback=config.calibration_fallback))
    else:
        bad = [s for s in config.full_steps if s >= num_steps]
        if bad:
            raise ValueError(f"full_steps {bad} out of range for {num_steps} U-Net evaluations (allowed 0..{num_steps - 1})")
        steps = set(config.full_steps)
    steps.add(0)
    end = num_steps if config.cache_end is None else min(config.cache_end, num_steps)
    steps.update(range(0, min(config.cache_start, num_steps)))
    steps.update(range(end, num_steps))
    return sorted(steps)


def full_step_mask(config: DeepCacheConfig, num_steps: int) -> list[bool]:
    full = set(full_steps(config, num_steps))
    return [i in full for i in range(num_steps)]


def theoretical_speedup(mask: list[bool], shallow_cost: float) -> float:
    """(F + C) / (F + C f) for F full and C cached steps, a cached step costing `shallow_cost` of a full one."""
    n_full = sum(mask)
    n_cached = len(mask) - n_full
    return len(mask) / (n_full + n_cached * shallow_cost)


def _check_num_steps(num_steps: int) -> None:
    check_int("num_steps", num_steps, 1)
