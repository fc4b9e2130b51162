"""Frozen settings: what DeepCache does (DeepCacheConfig) and what an engine build fixes (BuildConfig).

Every field is checked when the object is made: a wrong type or value is a ValueError that names the field and
says what is allowed. Integers may be any integral type (Python or numpy) but not bools or floats; nothing is
silently truncated.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field

SCHEDULES = ("uniform", "nonuniform", "explicit", "calibrated", "dynamic")
DTYPES = ("float32", "float16", "bfloat16")
MAX_POWER = 8.0  # the non-uniform schedule's power law; beyond this every full step sits at the center anyway


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int if it is an integer (not a bool, not a float) within [minimum, maximum]."""
    allowed = _range_text(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{allowed}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer{allowed}, got {value}")
    return value


def check_real(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a float if it is a finite real number (not a bool, not a string) in [low, high] (or (low, high])."""
    bracket = "(" if low_open else "["
    allowed = f"a finite number in {bracket}{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_power(power) -> float:
    """The non-uniform schedule's power: a finite number with 1 < power <= MAX_POWER."""
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or not math.isfinite(power) \
            or not 1.0 < power <= MAX_POWER:
        raise ValueError(f"power must be > 1 and <= {MAX_POWER:g} (the schedule lowers it towards 1 until its full "
                         f"steps fit), got {power!r}")
    return float(power)


def _range_text(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in {minimum}..{maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    return ""


def _int_tuple(name: str, values) -> tuple[int, ...]:
    """A list of integers >= 0 (any integral type, not bools, floats or strings)."""
    ok = not isinstance(values, (str, bytes)) and hasattr(values, "__iter__")
    items = list(values) if ok else []
    if not ok or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0 for v in items):
        raise ValueError(f"{name} must be >= 0 integers in a list (evaluation indices), got {values!r}")
    return tuple(int(v) for v in items)


@dataclass(frozen=True)
class DeepCacheConfig:
    """Which denoiser evaluations run the full graph, and where the denoiser is cut.

    interval:   run the full graph every `interval` evaluations (1 = never cache; None, the default: the model
                family's default, 3 for U-Nets and DEFAULT_INTERVAL in families/mmdit.py for SD 3 transformers).
    branch:     U-Nets: the skip branch, numbered as the reference's `cache_branch_id` (0 = shallowest,
                fastest; the default).
    head_blocks, tail_blocks: transformers (SD 3.x MMDiT): the first and last blocks that run on a cached step
                (the family's defaults when not given).
    schedule:   "uniform" (every `interval`), "nonuniform" (the paper's: full steps denser around `center`,
                spread by the power law `power`), "explicit" (exactly the evaluations in `full_steps`), or
                "calibrated" (the full steps a calibration found for a budget: see dcaccel.calibration), or
                "dynamic" (SD 3 transformers: a step is cached when a probe of the first blocks moved less than
                `threshold` since the last full step, decided per call for the whole batch; see policies.py).
    center, power:  shape of the non-uniform schedule (center defaults to 15 of 50 evaluations, scaled).
    full_steps: the explicit list of full evaluations (0-based; 0 is always added).
    cache_start, cache_end: optional window; outside [cache_start, cache_end) every evaluation is full.
    calibration: schedule="calibrated": a dcaccel.Calibration or the path of its JSON file.
    num_full_steps, speedup: schedule="calibrated": the budget, as a number of full evaluations, or as the FLOP
                bound to reach (the calibrated budget with the most full steps whose bound is >= speedup). Neither:
                the calibration's default budget.
    calibration_fallback: use a calibration made for another step count, guidance, scheduler, model or cut
                anyway (its full steps rescaled to the call's evaluations, with a warning naming what differs)
                instead of refusing it.
    threshold:  schedule="dynamic": the relative L1 change of the probe below which a step is cached.
    cut_controlnet: ControlNet pipelines: run only the ControlNets' first layers on cached steps (what the shallow
                U-Net reads; the default, same output). False runs them whole on every step.
    """

    interval: int | None = None
    branch: int | None = None
    head_blocks: int | None = None
    tail_blocks: int | None = None
    schedule: str = "uniform"
    center: int | None = None
    power: float = 1.4
    full_steps: tuple[int, ...] | None = None
    cache_start: int = 0
    cache_end: int | None = None
    cut_controlnet: bool = True
    calibration: object = None
    num_full_steps: int | None = None
    speedup: float | None = None
    calibration_fallback: bool = False
    threshold: float | None = None

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        self._check_calibration(put)
        if self.schedule == "dynamic":
            if self.threshold is None:
                raise ValueError("schedule='dynamic' needs threshold=, the relative L1 change of the probe below "
                                 "which a step is cached (e.g. 0.2)")
            put("threshold", check_real("threshold", self.threshold, 0.0, 10.0, low_open=True))
        elif self.threshold is not None:
            raise ValueError(f"threshold only applies with schedule='dynamic', not {self.schedule!r}")
        if not isinstance(self.cut_controlnet, bool):
            raise ValueError(f"cut_controlnet must be True or False, got {self.cut_controlnet!r}")
        if self.interval is not None:
            put("interval", check_int("interval", self.interval, 1))
        for name in ("branch", "head_blocks", "tail_blocks", "center", "cache_end"):
            if getattr(self, name) is not None:
                put(name, check_int(name, getattr(self, name), 0))
        put("cache_start", check_int("cache_start", self.cache_start, 0))
        put("power", check_power(self.power))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {list(SCHEDULES)}")
        if self.schedule == "explicit":
            if self.full_steps is None:
                raise ValueError("schedule='explicit' needs full_steps, a non-empty list of evaluation indices")
            put("full_steps", _int_tuple("full_steps", self.full_steps))
            if not self.full_steps:
                raise ValueError("schedule='explicit' needs full_steps, a non-empty list of evaluation indices")
        elif self.full_steps is not None:
            raise ValueError(f"full_steps is only used with schedule='explicit', not {self.schedule!r}")
        if self.cache_end is not None and self.cache_end <= self.cache_start:
            raise ValueError(f"cache_end must be > cache_start ({self.cache_start}), got {self.cache_end}")
        if self.branch is not None and (self.head_blocks is not None or self.tail_blocks is not None):
            raise ValueError("branch is the cut of a U-Net, head_blocks/tail_blocks that of a transformer: give one "
                             "or the other, not both")

    def _check_calibration(self, put) -> None:
        if not isinstance(self.calibration_fallback, bool):
            raise ValueError(f"calibration_fallback must be True or False, got {self.calibration_fallback!r}")
        if self.schedule != "calibrated":
            given = [n for n in ("calibration", "num_full_steps", "speedup") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply with schedule='calibrated', not {self.schedule!r}")
            return
        if self.calibration is None:
            raise ValueError("schedule='calibrated' needs calibration=, a dcaccel.Calibration or the path of a "
                             "calibration file (from dcaccel.calibrate or `dcaccel calibrate`)")
        from .calibration import Calibration

        if not isinstance(self.calibration, Calibration):
            put("calibration", Calibration.load(self.calibration))
        if self.num_full_steps is not None and self.speedup is not None:
            raise ValueError("give num_full_steps or speedup, not both (both choose the calibrated budget)")
        if self.num_full_steps is not None:
            budgets = self.calibration.budgets()
            put("num_full_steps", check_int("num_full_steps", self.num_full_steps, min(budgets), max(budgets)))
        if self.speedup is not None:
            put("speedup", check_real("speedup", self.speedup, 1.0, 1000.0))

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.calibration is not None:
            out["calibration"] = self.calibration.summary()
        return out


@dataclass(frozen=True)
class BuildConfig:
    """What an engine build fixes: shapes, dtype, the cut, the backend and its build options.

    The cut is `branch` for U-Nets, `head_blocks`/`tail_blocks` for transformers (None: the family's default).
    `options` are the backend's (see its Options class: an unknown key is an error that lists the allowed ones).
    """

    height: int = 512
    width: int = 512
    batch_size: int = 1            # images per prompt; the graph batch doubles with classifier-free guidance
    cfg: bool = True               # classifier-free guidance batched as [uncond, cond]
    dtype: str = "float32"
    branch: int | None = None
    head_blocks: int | None = None
    tail_blocks: int | None = None
    cut_controlnet: bool = True    # ControlNet pipelines: see DeepCacheConfig
    guess_mode: bool = False       # ControlNet pipelines: built for guess_mode calls (the ControlNets see half the batch)
    ip_adapter_images: int = 1     # IP-Adapter pipelines: images per adapter (the image embeddings' second dimension)
    ip_adapter_masks: bool = False  # IP-Adapter pipelines: graphs that take cross_attention_kwargs["ip_adapter_masks"]
    backend: str = "onnxruntime"
    device: str = "cpu"
    options: dict = field(default_factory=dict, hash=False, compare=True)

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("height", "width"):
            value = check_int(name, getattr(self, name), 8)
            if value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8 (the VAE's factor), got {value}")
            put(name, value)
        put("batch_size", check_int("batch_size", self.batch_size, 1, 64))
        put("ip_adapter_images", check_int("ip_adapter_images", self.ip_adapter_images, 1, 16))
        for name in ("cfg", "cut_controlnet", "guess_mode", "ip_adapter_masks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {list(DTYPES)}")
        for name in ("branch", "head_blocks", "tail_blocks"):
            if getattr(self, name) is not None:
                put(name, check_int(name, getattr(self, name), 0))
        if self.branch is not None and (self.head_blocks is not None or self.tail_blocks is not None):
            raise ValueError("branch is the cut of a U-Net, head_blocks/tail_blocks that of a transformer: give one "
                             "or the other, not both")
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict of backend options, got {type(self.options).__name__}")

    @property
    def graph_batch(self) -> int:
        return self.batch_size * (2 if self.cfg else 1)

    def cache_config(self) -> DeepCacheConfig:
        """The cut as a DeepCacheConfig (what a family resolves)."""
        return DeepCacheConfig(branch=self.branch, head_blocks=self.head_blocks, tail_blocks=self.tail_blocks,
                               cut_controlnet=self.cut_controlnet)

    def to_dict(self) -> dict:
        return asdict(self)
