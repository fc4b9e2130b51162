import pytest

from dcaccel.config import DeepCacheConfig
from dcaccel.schedule import (full_step_mask, full_steps, nonuniform_full_steps, theoretical_speedup,
                              uniform_full_steps)


def test_uniform_by_hand():
    assert uniform_full_steps(5, 2) == [0, 2, 4]
    assert uniform_full_steps(10, 3) == [0, 3, 6, 9]
    assert uniform_full_steps(4, 1) == [0, 1, 2, 3]
    assert uniform_full_steps(2, 5) == [0]


def test_nonuniform_count_and_density():
    steps = nonuniform_full_steps(50, 3, center=15, power=1.4)
    assert len(steps) == 17 == -(-50 // 3)
    assert steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] < 50
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    near = [g for a, g in zip(steps, gaps) if 10 <= a <= 20]
    far = [g for a, g in zip(steps, gaps) if a >= 35]
    assert max(near) < min(far), (steps, "full steps should be denser around the center")


def test_nonuniform_degenerate_cases():
    assert nonuniform_full_steps(5, 1) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="center"):
        nonuniform_full_steps(10, 3, center=10)


def test_explicit_and_window():
    cfg = DeepCacheConfig(schedule="explicit", full_steps=[5, 2])
    assert full_steps(cfg, 8) == [0, 2, 5]
    with pytest.raises(ValueError, match=r"full_steps \[9\] out of range for 8 .*0\.\.7"):
        full_steps(DeepCacheConfig(schedule="explicit", full_steps=[2, 9]), 8)
    cfg = DeepCacheConfig(interval=4, cache_start=2, cache_end=7)
    assert full_steps(cfg, 10) == [0, 1, 4, 7, 8, 9]
    assert full_step_mask(DeepCacheConfig(interval=2), 4) == [True, False, True, False]


def test_theoretical_speedup_formula():
    mask = full_step_mask(DeepCacheConfig(interval=3), 20)  # 7 full, 13 cached
    assert theoretical_speedup(mask, 0.066) == pytest.approx(20 / (7 + 13 * 0.066))
    assert theoretical_speedup([True] * 5, 0.3) == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(interval=0), "interval must be an integer >= 1, got 0"),
    (dict(interval=2.5), "interval must be an integer"),
    (dict(branch=-1), "branch must be an integer >= 0"),
    (dict(schedule="cosine"), "unknown schedule 'cosine'; choose from"),
    (dict(schedule="explicit"), "needs full_steps"),
    (dict(schedule="explicit", full_steps=[-1]), "full_steps must be >= 0"),
    (dict(full_steps=[1]), "only used with schedule='explicit'"),
    (dict(power=1.0), "power must be > 1"),
    (dict(cache_start=5, cache_end=5), "cache_end must be > cache_start"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepCacheConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="nonuniform", power=1e9), "power must be > 1 and <= 8"),
    (dict(schedule="nonuniform", power=float("inf")), "power must be > 1"),
    (dict(power=float("nan")), "power must be > 1"),
    (dict(power="2"), "power must be > 1"),
    (dict(schedule="explicit", full_steps=5), "full_steps must be >= 0 integers in a list"),
    (dict(schedule="explicit", full_steps=["a"]), "full_steps must be >= 0 integers in a list"),
    (dict(schedule="explicit", full_steps="3"), "full_steps must be >= 0 integers in a list"),
    (dict(schedule="explicit", full_steps=[0, 2.7]), "full_steps must be >= 0 integers in a list"),
    (dict(schedule="explicit", full_steps=[True]), "full_steps must be >= 0 integers in a list"),
    (dict(schedule="explicit", full_steps=[]), "needs full_steps, a non-empty list"),
    (dict(interval="3"), "interval must be an integer >= 1, got '3'"),
    (dict(interval=True), "interval must be an integer"),
    (dict(interval=3.0), "interval must be an integer"),
    (dict(branch=1.5), "branch must be an integer >= 0"),
    (dict(center=2.5), "center must be an integer >= 0"),
    (dict(cache_start="1"), "cache_start must be an integer >= 0"),
    (dict(branch=0, head_blocks=1), "give one or the other, not both"),
])
def test_bad_types_and_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepCacheConfig(**kwargs)


def test_huge_power_returns_at_once():
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match="power"):
        nonuniform_full_steps(50, 3, power=1e9)
    assert nonuniform_full_steps(50, 3, power=8.0)  # the largest allowed finishes
    assert time.perf_counter() - start < 5


def test_numpy_integers_are_integers():
    import numpy as np

    cfg = DeepCacheConfig(interval=np.int64(3), branch=np.int32(1), schedule="explicit",
                          full_steps=np.array([0, 4]), cache_start=np.int64(0))
    assert cfg.interval == 3 and type(cfg.interval) is int and cfg.full_steps == (0, 4)
    assert all(type(s) is int for s in cfg.full_steps)
    assert full_steps(cfg, 6) == [0, 4]


def test_the_default_interval_is_the_model_familys():
    from dcaccel.families import get_family
    from dcaccel.families.mmdit import DEFAULT_INTERVAL

    assert DeepCacheConfig().interval is None
    with pytest.raises(ValueError, match="interval is None .*resolve_config"):
        full_steps(DeepCacheConfig(), 10)
    assert get_family("unet").resolve_config(DeepCacheConfig()).interval == 3
    assert get_family("mmdit").resolve_config(DeepCacheConfig(head_blocks=2)) == DeepCacheConfig(
        interval=DEFAULT_INTERVAL, head_blocks=2)
    given = DeepCacheConfig(interval=5)
    assert get_family("mmdit").resolve_config(given) is given
