"""One replica's model: the pipeline with DeepCache on its backend, loaded once, and a batch of requests turned
into one pipeline call. No Ray here: the deployments in app.py wrap it, and tests call it directly."""

from __future__ import annotations

import copy
import io
import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from ..models import TRAINED
from .request import Limits

logger = logging.getLogger(__name__)

MAX_STEPS = 200


@dataclass
class ServeSettings:
    """What `dcaccel serve` serves and how; also the `args` of the Serve config file."""

    model: str = "shapes"
    backend: str = "eager"
    engine_dirs: list[str] = field(default_factory=list)
    interval: int | None = None  # None: the model family's default
    branch: int | None = None
    head_blocks: int | None = None
    tail_blocks: int | None = None
    no_cache: bool = False
    calibration: str | None = None  # a calibration file; None: an engine directory's, or a shipped model's
    num_full_steps: int | None = None
    speedup: float | None = None
    replicas: int = 1
    max_batch: int = 4
    batch_wait_ms: float = 20.0
    max_queued: int = 32
    deadline_s: float = 120.0
    threads: int | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    resources_per_replica: dict[str, float] = field(default_factory=dict)  # Ray custom resources, e.g. {"slot": 1}
    ingress_resources: dict[str, float] = field(default_factory=dict)  # the same for the ingress (pins its node)
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        from ..backends import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {sorted(BACKENDS)}")
        for name, low in (("replicas", 1), ("max_batch", 1), ("max_queued", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"batch_wait_ms must be in 0..10000, got {self.batch_wait_ms}")
        if not 0 < self.deadline_s <= 86_400:
            raise ValueError(f"deadline_s must be in (0, 86400], got {self.deadline_s}")
        for name in ("resources_per_replica", "ingress_resources"):
            _check_resources(name, getattr(self, name))
        if self.engine_dirs and self.backend == "eager":
            raise ValueError("engine_dirs need an engine backend (onnxruntime, torch_compile or tensorrt)")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_resources(name: str, resources) -> None:
    """Ray custom resources: names to numbers >= 0, not Ray's own (those have their own settings)."""
    if not isinstance(resources, dict) or not all(
            isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in resources.items()):
        raise ValueError(f'{name} must map resource names to numbers >= 0, e.g. {{"dcaccel_slot": 1}}; '
                         f"got {resources!r}")
    reserved = sorted(set(resources) & {"CPU", "GPU", "memory", "object_store_memory"})
    if reserved:
        raise ValueError(f"{name}: {reserved} are Ray's own resources; give CPUs and GPUs with cpus_per_replica "
                         "and gpus_per_replica (--cpus-per-replica, --gpus-per-replica)")


def _actor_resources(resources: dict) -> dict:
    return {"resources": dict(resources)} if resources else {}


def png_bytes(image) -> bytes:
    """The PNG `dcaccel generate` writes for the same image (PIL's encoder, default settings)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


APP_NAME = "dcaccel"


def deployment_options(settings: ServeSettings) -> dict[str, dict]:
    """Ray Serve options of the two deployments, for `dcaccel serve` and for the config file alike. Shutdown
    waits as long as a request may run (a drain lets in-flight requests finish)."""
    drain = {"graceful_shutdown_timeout_s": settings.deadline_s + 10}
    return {
        "Generator": {"max_ongoing_requests": max(settings.max_batch * 2, 4),  # enough waiting to fill a batch
                      "max_queued_requests": settings.max_queued, **drain,
                      "ray_actor_options": {"num_cpus": settings.cpus_per_replica,
                                            "num_gpus": settings.gpus_per_replica,
                                            **_actor_resources(settings.resources_per_replica)}},
        "Ingress": {**drain, "ray_actor_options": {"num_cpus": 0, **_actor_resources(settings.ingress_resources)}},
    }


class ModelServer:
    """The pipeline of one replica and what it can serve."""

    def __init__(self, settings: ServeSettings):
        from .. import pipeline as dc
        from ..config import DeepCacheConfig
        from ..families import family_of_pipeline
        from ..models import default_resolution, load_pipeline

        self.settings = s = settings
        if s.threads:
            torch.set_num_threads(s.threads)
        start = time.perf_counter()
        self.pipe = load_pipeline(s.model, dtype=getattr(torch, s.dtype))
        if s.device != "cpu":
            self.pipe.to(s.device)
        self.family = family_of_pipeline(self.pipe)
        self.denoiser_attr = self.family.denoiser_attr
        self.default_size = default_resolution(self.pipe)
        # a copy for checking prompts on the event loop: a tokenizer is not safe to share with the pipeline's call
        # running in its thread (an unpadded prompt once reached the text encoder that way)
        self.check_tokenizer = copy.deepcopy(self.pipe.tokenizer)
        self.default_guidance, self.default_steps = self._defaults()
        self.calibration = None if s.no_cache else self._calibration()
        if self.calibration is not None:
            # requests with another step count or guidance run the calibrated steps rescaled (X-Schedule says so)
            self.config = DeepCacheConfig(schedule="calibrated", calibration=self.calibration,
                                          num_full_steps=s.num_full_steps, speedup=s.speedup,
                                          calibration_fallback=True, branch=s.branch, head_blocks=s.head_blocks,
                                          tail_blocks=s.tail_blocks)
        else:
            self.config = DeepCacheConfig(interval=1 if s.no_cache else s.interval, branch=s.branch,
                                          head_blocks=s.head_blocks, tail_blocks=s.tail_blocks)
        # what /v1/models reports: the interval (or calibration) and cut with the family's defaults filled in
        cut = self.family.resolve_cut(self.family.denoiser(self.pipe), self.config)
        if self.calibration is not None:
            cal = self.calibration
            budget = cal.choose_budget(s.num_full_steps, s.speedup)
            self.resolved = {"schedule": "calibrated", "calibration": cal.path, "num_full_steps": budget,
                             "full_steps": cal.budget(budget)["full_steps"], "calibrated_steps": cal.num_evaluations,
                             "calibrated_guidance": cal.valid_for["guidance_scale"], **cut}
        else:
            self.resolved = {"interval": self.family.resolve_config(self.config).interval, **cut}
        self.runners = {}  # (height, width) -> (runner, info) for static backends
        self.cfg = self.default_guidance > 1
        if s.backend == "eager":
            dc.enable(self.pipe, self.config)
            self.sizes = None
        else:
            self._open_engines()
        self.load_seconds = time.perf_counter() - start
        logger.info("model %s ready in %.1f s", s.model, self.load_seconds)

    def _calibration(self):
        """--calibration; else the first engine directory's calibration.json; else, with no --interval and no
        cut given, the calibration shipped with an embedded trained model."""
        import os

        from ..calibration import Calibration
        from ..models import shipped_calibration

        s = self.settings
        if s.calibration:
            return Calibration.load(s.calibration)
        for directory in s.engine_dirs:
            if os.path.isfile(os.path.join(directory, "calibration.json")):
                return Calibration.load(directory)
        if s.interval is None and s.branch is None and s.head_blocks is None and s.tail_blocks is None:
            path = shipped_calibration(s.model)
            return Calibration.load(path) if path else None
        if s.num_full_steps is not None or s.speedup is not None:
            raise ValueError("num_full_steps and speedup need a calibration (--calibration FILE)")
        return None

    def schedule_text(self, steps: int, guidance: float) -> str:
        """What X-Schedule reports for a request: the interval, or the calibration and whether it fell back."""
        if self.settings.no_cache:
            return "off"
        if self.calibration is None:
            return f"uniform, interval {self.resolved['interval']}"
        cal = self.calibration
        diffs = cal.check_call(steps, guidance, fallback=True)
        if not diffs:
            return f"calibrated, {self.resolved['num_full_steps']} full steps of {cal.num_evaluations}"
        return (f"calibrated fallback: calibrated for {cal.num_evaluations} steps at guidance "
                f"{cal.valid_for['guidance_scale']}, rescaled to {steps} steps")

    def _defaults(self) -> tuple[float, int]:
        if self.settings.model in TRAINED:  # the shapes models
            from .. import shapes

            return float(shapes.GUIDANCE_SCALE), 20
        return (7.0 if self.family.name == "mmdit" else 7.5), 20

    def _open_engines(self) -> None:
        """Static-shape backends: one runner per engine resolution (built now for the default size and
        max_batch images if no engine directory is given)."""
        from ..engines import Manifest, open_runner

        s = self.settings
        if s.engine_dirs:
            for directory in s.engine_dirs:
                manifest = Manifest.read(directory)
                b = manifest.build
                if b["batch_size"] != s.max_batch:
                    raise ValueError(f"engine {directory} was built for batch {b['batch_size']}; this server batches "
                                     f"up to --max-batch {s.max_batch} images: build it with --batch {s.max_batch}")
                size = (b["height"], b["width"])
                if size in self.runners:
                    raise ValueError(f"two engine directories for {size[0]}x{size[1]}: give one per resolution")
                if self.runners and b["cfg"] != self.cfg:
                    kind = "with" if b["cfg"] else "without"
                    raise ValueError(f"engine {directory} was built {kind} classifier-free guidance, the others not: "
                                     "a server's engines must agree (--no-cfg or not)")
                self.cfg = b["cfg"]
                runner, info = open_runner(self.pipe, self.config, s.backend, engine_dir=directory)
                self.runners[size] = (runner, info)
        else:
            size = self.default_size
            runner, info = open_runner(self.pipe, self.config, s.backend, height=size, width=size,
                                       batch_size=s.max_batch, cfg=self.cfg, dtype=s.dtype)
            self.runners[(size, size)] = (runner, info)
        self.sizes = tuple(sorted(self.runners))
        # what a request that names no size or guidance gets: something these engines run
        square = [h for h, w in self.sizes if h == w]
        if (self.default_size, self.default_size) not in self.runners and square:
            self.default_size = square[0]
        if not self.cfg:
            self.default_guidance = 1.0

    def limits(self) -> Limits:
        vae = int(self.pipe.vae_scale_factor)
        multiple = vae * (self.family.denoiser(self.pipe).config.patch_size if self.family.name == "mmdit" else 1)
        return Limits(default_size=self.default_size, sizes=self.sizes, multiple=max(8, multiple),
                      max_size=max([2 * self.default_size] + [max(hw) for hw in self.sizes or ()]), max_steps=MAX_STEPS,
                      default_steps=self.default_steps, default_guidance=self.default_guidance,
                      max_prompt_tokens=int(self.pipe.tokenizer.model_max_length))

    def describe(self) -> dict:
        s = self.settings
        return {"model": s.model, "family": self.family.name, "backend": s.backend,
                "engines": [{"height": h, "width": w, "batch": s.max_batch, "cfg": self.cfg}
                            for h, w in (self.sizes or [])] or "any size (eager)",
                "deepcache": "off" if s.no_cache else self.resolved,
                "defaults": {"height": self.default_size, "width": self.default_size, "steps": self.default_steps,
                             "guidance": self.default_guidance},
                "max_batch": s.max_batch, "batch_wait_ms": s.batch_wait_ms, "device": s.device, "dtype": s.dtype}

    def check_prompt(self, params: dict) -> str | None:
        """Why a request cannot run here (too many prompt tokens, guidance the engine was not built for), or
        None."""
        limit = int(self.pipe.tokenizer.model_max_length)
        for name in ("prompt", "negative_prompt"):
            text = params.get(name)
            if text:
                n = len(self.check_tokenizer(text, truncation=False)["input_ids"])
                if n > limit:
                    return f"field {name!r} is {n} tokens long; this model reads at most {limit}"
        if self.sizes is not None and (params["guidance"] > 1) != self.cfg:
            return (f"field 'guidance': this server's engines were built for guidance "
                    f"{'> 1' if self.cfg else '<= 1'}, got {params['guidance']}")
        return None

    def _attach(self, size) -> None:
        """Static backends: put the runner of this resolution in the pipeline (one enabled at a time)."""
        from .. import pipeline as dc

        if self.sizes is None:
            return
        state = dc.enabled_state(self.pipe)
        runner, info = self.runners[size]
        if state is not None and state.runner is runner:
            return
        if state is not None:
            dc.disable(self.pipe, close=False)
        dc.attach(self.pipe, self.config, self.settings.backend, runner, info)

    def generate(self, params: list[dict]) -> list[dict]:
        """One pipeline call for requests that share height, width, steps and guidance. Each keeps its own seed
        (one generator per image); a static engine's batch is filled up with copies of the last request, whose
        images are dropped."""
        from .. import pipeline as dc

        first = params[0]
        size = (first["height"], first["width"])
        self._attach(size)
        n = len(params)
        padded = params + [params[-1]] * ((self.settings.max_batch - n) if self.sizes is not None else 0)
        start = time.perf_counter()
        negatives = [p.get("negative_prompt") or "" for p in padded]
        out = self.pipe(prompt=[p["prompt"] for p in padded],
                        negative_prompt=negatives if any(negatives) else None,
                        num_inference_steps=first["steps"], guidance_scale=first["guidance"],
                        height=size[0], width=size[1],
                        generator=[torch.Generator("cpu").manual_seed(p["seed"]) for p in padded])
        seconds = time.perf_counter() - start
        stats = dc.last_stats(self.pipe)
        results = []
        for p, image in zip(params, out.images[:n]):
            results.append({"png": png_bytes(image), "seed": p["seed"], "batch_size": n, "padded_to": len(padded),
                            "pipeline_s": seconds, "denoiser_s": stats.denoiser_seconds,
                            "full_steps": len(stats.full_steps), "shallow_steps": len(stats.shallow_steps),
                            "schedule": self.schedule_text(first["steps"], first["guidance"])})
        return results
