"""Frozen settings: what DeepCache does (DeepCacheConfig) and what an engine build fixes (BuildConfig)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCHEDULES = ("uniform", "nonuniform", "explicit")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class DeepCacheConfig:
    """Which U-Net evaluations run the full graph, and where the U-Net is cut.

    interval:   run the full U-Net every `interval` evaluations (1 = never cache).
    branch:     skip branch, numbered as the reference's `cache_branch_id` (0 = shallowest, fastest).
    schedule:   "uniform" (every `interval`), "nonuniform" (the paper's: full steps denser around `center`,
                spread by the power law `power`), or "explicit" (exactly the evaluations in `full_steps`).
    center, power:  shape of the non-uniform schedule (center defaults to 15 of 50 evaluations, scaled).
    full_steps: the explicit list of full evaluations (0-based; 0 is always added).
    cache_start, cache_end: optional window; outside [cache_start, cache_end) every evaluation is full.
    """

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    center: int | None = None
    power: float = 1.4
    full_steps: tuple[int, ...] | None = None
    cache_start: int = 0
    cache_end: int | None = None

    def __post_init__(self):
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if not isinstance(self.branch, int) or isinstance(self.branch, bool) or self.branch < 0:
            raise ValueError(f"branch must be an integer >= 0, got {self.branch!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {list(SCHEDULES)}")
        if self.schedule == "explicit":
            if not self.full_steps:
                raise ValueError("schedule='explicit' needs full_steps, a non-empty list of evaluation indices")
            object.__setattr__(self, "full_steps", tuple(int(s) for s in self.full_steps))
            if min(self.full_steps) < 0:
                raise ValueError(f"full_steps must be >= 0, got {list(self.full_steps)}")
        elif self.full_steps is not None:
            raise ValueError(f"full_steps is only used with schedule='explicit', not {self.schedule!r}")
        if self.power <= 1.0:
            raise ValueError(f"power must be > 1 (the schedule lowers it towards 1 until it fits), got {self.power}")
        if self.center is not None and self.center < 0:
            raise ValueError(f"center must be >= 0, got {self.center}")
        if self.cache_start < 0:
            raise ValueError(f"cache_start must be >= 0, got {self.cache_start}")
        if self.cache_end is not None and self.cache_end <= self.cache_start:
            raise ValueError(f"cache_end must be > cache_start ({self.cache_start}), got {self.cache_end}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BuildConfig:
    """What an engine build fixes. Every field here is part of the engine key (see manifest.engine_key)."""

    height: int = 512
    width: int = 512
    batch_size: int = 1            # images per prompt; the graph batch doubles with classifier-free guidance
    cfg: bool = True               # classifier-free guidance batched as [uncond, cond]
    dtype: str = "float32"
    branch: int = 0
    backend: str = "onnxruntime"
    device: str = "cpu"
    fp16: bool = False             # TensorRT: allow fp16 kernels
    refittable: bool = False       # TensorRT: build refittable engines (LoRA swaps)
    options: dict = field(default_factory=dict, hash=False, compare=True)

    def __post_init__(self):
        for name in ("height", "width"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8 (the VAE's factor), got {v!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {list(DTYPES)}")
        if self.branch < 0:
            raise ValueError(f"branch must be >= 0, got {self.branch}")

    @property
    def graph_batch(self) -> int:
        return self.batch_size * (2 if self.cfg else 1)

    def to_dict(self) -> dict:
        return asdict(self)
