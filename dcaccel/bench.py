"""`dcaccel bench`: latency, memory and fidelity of DeepCache on each backend, measured in one run against the
plain diffusers pipeline, each backend's own no-cache run and the reference DeepCacheSDHelper.

One run: load a pipeline (or build an embedded architecture with random weights) -> plan the configurations
(plain diffusers; per backend its no-cache run, then each DeepCache setting; the reference helper per uniform
setting) -> per configuration: build once, enable once, and per step count warm up, time `repeats` calls and
compare the output with the matching no-cache output -> one record per configuration and step count ->
results.jsonl (written as it goes), results.md, results.png, and in sweep mode recommendation.json.

Every number in a record was measured in this run or computed from measured numbers and FLOP counts; a
configuration that did not run has status "not run: <why>" or "failed: <error>" and no numbers.
See benchmarks/README.md for the fields.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import BuildConfig, DeepCacheConfig
from .engines import build_engines
from .errors import MissingDependencyError
from .families.unet import graph_specs, num_branches, split_unet
from .models import ARCHITECTURES, TRAINED, build_pipeline, default_resolution, load_pipeline
from .pipeline import disable, enable, last_stats
from .runtime import StepStats

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "torch_compile", "onnxruntime", "tensorrt")
ENGINE_BACKENDS = ("onnxruntime", "tensorrt")  # built once per branch with build_engines, loaded per configuration
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
BENCH_SCHEDULES = ("uniform", "nonuniform")
SWEEP_INTERVALS = (2, 3, 4, 5)
SWEEP_BRANCHES = (0, 1, 2)
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
NO_CACHE = DeepCacheConfig(interval=1, branch=0)  # the whole U-Net as the backend's full graph, every step


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(q k^T) v counted as its two batched matmuls, 2*B*L*S*E + 2*B*L*S*Ev (B = all leading
    dims); the softmax is not counted, as FlopCounterMode counts no elementwise op."""
    *lead, length, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    b = math.prod(lead)
    return 2 * b * length * s * e + 2 * b * length * s * ev


SDPA_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",  # what CPU attention runs in torch 2.13: no formula there
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)


def sdpa_flop_formulas() -> dict:
    """A custom_mapping for FlopCounterMode: a formula for each SDPA kernel torch's counter has none for."""
    from torch.utils.flop_counter import flop_registry

    out = {}
    for name in SDPA_KERNELS:
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            out[op] = sdpa_flops
    return out


def count_flops(module: torch.nn.Module, inputs: dict) -> int:
    """FLOPs of one call module(**inputs), attention included."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa_flop_formulas()) as counter:
        module(**inputs)
    return int(counter.get_total_flops())


def graph_flops(unet, build: BuildConfig, vae_scale: int, text_len: int) -> dict:
    """FLOPs of one call of the full and of the shallow graph at `build`'s shapes and branch.

    Counted on a copy of the architecture on the meta device (no weights, no arithmetic; the counts equal those
    on CPU, see tests/test_bench.py), or on the U-Net itself if that copy cannot be made.
    """
    branch = build.branch or 0
    specs = graph_specs(unet, branch, build, vae_scale, text_len)
    attempts = [("meta", "FlopCounterMode on a meta-device copy of the U-Net"),
                (unet.device, "FlopCounterMode on the U-Net")]
    for device, method in attempts:
        try:
            if device == "meta":
                with torch.device("meta"):
                    model = type(unet).from_config(unet.config).eval()
            else:
                model = unet
            full, shallow = split_unet(model, branch)
            counts = {name: count_flops(graph, specs[name].sample_inputs(device=device))
                      for name, graph in (("full", full), ("shallow", shallow))}
            return {**counts, "method": method}
        except Exception as e:  # a kernel without a meta implementation, say: count on the real U-Net
            logger.info("FLOP count (%s) failed: %s", method, e)
    raise RuntimeError("could not count the FLOPs of the split graphs")


def theoretical_speedup(num_evaluations: int, n_full: int, n_shallow: int, f_full: int, f_shallow: int) -> float:
    """N * F_full / (n_full * F_full + n_shallow * F_shallow): the bound FLOPs set for this schedule."""
    return num_evaluations * f_full / (n_full * f_full + n_shallow * f_shallow)


# ----------------------------------------------------------------------------------------------------------------
# Fidelity


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, data_range]; inf for identical images."""
    mse = float(((x.double() - ref.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of images (B, C, H, W) or (C, H, W) in [0, data_range].

    Gaussian window 11x11 with sigma 1.5, K1 = 0.01, K2 = 0.03, each channel on its own, statistics weighted by
    the window and taken over the valid region (no padding), the map averaged over pixels, channels and images.
    A side shorter than 11 shrinks the window to the largest odd size that fits.
    """
    if x.shape != ref.shape:
        raise ValueError(f"ssim needs images of one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    if x.dim() == 3:
        x, ref = x[None], ref[None]
    x, ref = x.double(), ref.double()
    channels, height, width = x.shape[1:]
    size = min(window, height, width)
    size -= 1 - size % 2
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, size, size).to(x.device)

    def blur(t):
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(ref)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(ref * ref) - mu_y ** 2
    cov = blur(x * ref) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], (B, 3, H, W) float32, as the pipeline's own decoding does it."""
    vae = pipe.vae
    cfg = vae.config
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / cfg.scaling_factor + mean
    else:
        latents = latents / cfg.scaling_factor
    with torch.no_grad():
        images = vae.decode(latents, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


@dataclass
class Output:
    """What a configuration produced for one step count: the latents of its first call, decoded once."""

    latents: torch.Tensor
    images: torch.Tensor


def fidelity(out: Output, ref: Output) -> dict:
    p = psnr(out.images, ref.images)
    return {"latent_rel_l2": rel_l2(out.latents, ref.latents), "psnr_db": None if math.isinf(p) else p,
            "images_identical": math.isinf(p), "ssim": ssim(out.images, ref.images)}


# ----------------------------------------------------------------------------------------------------------------
# Memory and timing


def _proc_status_kb(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so that RSS before a window is what is really in use."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Peak memory during a `with` block: peak_mb above the level when it began, peak_total_mb in all (MiB;
    None if not measurable).

    CUDA: torch.cuda.max_memory_allocated. CPU on Linux: the process's peak RSS (VmHWM) after resetting it
    through /proc/self/clear_refs. Elsewhere: RSS sampled every 5 ms by psutil in a thread. On CPU the heap is
    trimmed first (glibc malloc_trim), so memory freed by earlier configurations does not hide this one's.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self.peak_total_mb: float | None = None
        if self.device.type == "cuda":
            self.kind = "cuda"
        elif _reset_peak_rss():
            self.kind = "vmhwm"
        elif importlib.util.find_spec("psutil") is not None:
            self.kind = "psutil"
        else:
            self.kind = None

    @property
    def method(self) -> str:
        return {
            "cuda": "torch.cuda.max_memory_allocated during the calls (warm-up included), minus memory "
                    "allocated before them",
            "vmhwm": "peak RSS of the process during the calls (warm-up included; Linux VmHWM reset via "
                     "/proc/self/clear_refs), minus RSS before them (heap trimmed first)",
            "psutil": "peak RSS during the calls (warm-up included; psutil, sampled every 5 ms), minus RSS before "
                      "them (heap trimmed first)",
            None: "not measured: no CUDA, no /proc/self/clear_refs and no psutil",
        }[self.kind]

    def __enter__(self):
        self.peak_mb = self.peak_total_mb = None
        if self.kind in ("vmhwm", "psutil"):
            _trim_heap()
        if self.kind == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif self.kind == "vmhwm":
            _reset_peak_rss()
            self._base = _proc_status_kb("VmRSS") * 1024
        elif self.kind == "psutil":
            import psutil

            proc = psutil.Process()
            self._base = self._peak = proc.memory_info().rss
            self._stop = threading.Event()

            def sample():
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.kind == "vmhwm":
            peak = _proc_status_kb("VmHWM") * 1024
        elif self.kind == "psutil":
            self._stop.set()
            self._thread.join()
            peak = self._peak
        else:
            return False
        self.peak_mb = max(peak - self._base, 0) / 2 ** 20
        self.peak_total_mb = peak / 2 ** 20
        return False


class UNetTimer:
    """Times each evaluation of a pipeline's own U-Net (plain diffusers or the reference helper) with forward
    hooks, into the StepStats the dcaccel runtime keeps. An evaluation counts as full when the mid block's first
    resnet ran: DeepCacheSDHelper returns the cached mid-block output on cached steps without running it."""

    def __init__(self, unet, sync):
        self._unet, self._sync = unet, sync
        self._handles = []
        self.reset()

    def reset(self):
        self.stats = StepStats()
        self._step = 0

    def take(self):
        """The StepStats of the last call; starts counting afresh for the next."""
        stats = self.stats
        self.reset()
        return stats

    def __enter__(self):
        self.reset()
        self._handles = [self._unet.register_forward_pre_hook(self._pre),
                         self._unet.register_forward_hook(self._post),
                         self._unet.mid_block.resnets[0].register_forward_hook(self._deep)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _pre(self, module, args):
        self._sync()
        self._deep_ran = False
        self._start = time.perf_counter()

    def _deep(self, module, args, output):
        self._deep_ran = True

    def _post(self, module, args, output):
        self._sync()
        elapsed = time.perf_counter() - self._start
        full = self._deep_ran
        (self.stats.full_steps if full else self.stats.shallow_steps).append(self._step)
        (self.stats.full_seconds if full else self.stats.shallow_seconds).append(elapsed)
        self._step += 1


@dataclass
class Measurement:
    """One configuration at one step count: timings of the timed calls, and the first call's latents."""

    latents: torch.Tensor
    pipeline_seconds: list[float] = field(default_factory=list)
    unet_seconds: list[float] = field(default_factory=list)
    full_seconds: list[float] = field(default_factory=list)
    shallow_seconds: list[float] = field(default_factory=list)
    full_steps: list[int] = field(default_factory=list)
    num_evaluations: int = 0
    peak_mb: float | None = None
    peak_total_mb: float | None = None
    not_timed: str | None = None


def measure(call, take_stats, warmup: int, repeats: int, memory: PeakMemory, check=None) -> Measurement:
    """Run `call` (one pipeline call, returns latents) `warmup` times untimed, then `repeats` times timed, all
    inside one memory window.

    `take_stats()` gives the StepStats of the call just made. The first call's latents are kept for fidelity
    (every call uses the same seed). If the first call is a warm-up and `check(latents)` returns a reason, the
    timed calls are skipped (the sweep's pruning of settings outside the fidelity bound).
    """
    m = Measurement(None)
    with memory:
        for i in range(warmup + repeats):
            start = time.perf_counter()
            latents = call()
            seconds = time.perf_counter() - start
            stats = take_stats()
            if i == 0:
                m.latents = latents
                if warmup and check and (reason := check(latents)):
                    m.not_timed = reason
                    break
            if i >= warmup:
                m.pipeline_seconds.append(seconds)
                m.unet_seconds.append(stats.unet_seconds)
                m.full_seconds += stats.full_seconds
                m.shallow_seconds += stats.shallow_seconds
    m.peak_mb, m.peak_total_mb = memory.peak_mb, memory.peak_total_mb
    m.full_steps = list(stats.full_steps)
    m.num_evaluations = len(stats.full_steps) + len(stats.shallow_steps)
    return m


def _median(xs):
    return float(statistics.median(xs)) if xs else None


def _p90(xs):
    return float(np.percentile(xs, 90)) if xs else None


def _ratio(a, b):
    return a / b if a is not None and b else None


# ----------------------------------------------------------------------------------------------------------------
# Machine and settings


def machine_info() -> dict:
    from importlib import metadata

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": {pkg: version(pkg) for pkg in ("torch", "diffusers", "onnxruntime", "DeepCache", "dcaccel")},
    }


def _int_items(values, what) -> list[int]:
    out = []
    for v in values:
        for item in str(v).split(","):
            if item.strip():
                try:
                    out.append(int(item))
                except ValueError:
                    raise ValueError(f"{what} takes integers (space- or comma-separated), got {item!r}") from None
    return out


def _unique(xs):
    return list(dict.fromkeys(xs))


def _finite(record: dict) -> dict:
    """NaN or inf (a broken backend's output, say) become None, listed in `non_finite`: JSON stays valid."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    logger.warning("%s: non-finite %s", record.get("label"), bad)
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "non_finite": bad}


# ----------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Case:
    """One configuration: plain diffusers ("baseline"), dcaccel on a backend, or the reference helper."""

    kind: str                            # "baseline" | "dcaccel" | "reference"
    backend: str                         # "diffusers" for the baseline, "eager" for the reference
    config: DeepCacheConfig | None = None
    not_run: str | None = None           # why it will not run, decided while planning

    @property
    def cache(self) -> str:
        c = self.config
        if c is None or self.kind == "baseline":
            return "-"
        return "no cache" if c.interval == 1 else f"interval {c.interval}, branch {c.branch}, {c.schedule}"

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return "diffusers (no dcaccel)"
        name = "reference DeepCacheSDHelper" if self.kind == "reference" else self.backend
        return name if self.config is None else f"{name}: {self.cache}"

    @property
    def is_no_cache(self) -> bool:
        return self.kind == "dcaccel" and self.config is not None and self.config.interval == 1


def _tensorrt_unavailable() -> str | None:
    if importlib.util.find_spec("dcaccel.backends.tensorrt") is None:
        return "not run: dcaccel.backends.tensorrt is not in this installation"
    if not torch.cuda.is_available():
        return "not run: TensorRT needs a CUDA GPU and torch sees none"
    if importlib.util.find_spec("tensorrt") is None:
        return "not run: the tensorrt package is not installed (pip install 'dcaccel[gpu]')"
    return None


def plan(backends, settings: list[DeepCacheConfig], reference: bool) -> list[Case]:
    """Baseline; eager's no-cache run (always: every speedup is against it); per backend its no-cache run then
    each setting; the reference helper per setting right after eager's rows."""
    cases = [Case("baseline", "diffusers")]
    order = ["eager"] + [b for b in backends if b != "eager"]
    for backend in order:
        if backend == "tensorrt" and (reason := _tensorrt_unavailable()):
            cases.append(Case("dcaccel", backend, not_run=reason))
            continue
        cases.append(Case("dcaccel", backend, NO_CACHE))
        if backend not in backends:
            continue  # eager's no-cache run only, as the point of comparison
        cases += [Case("dcaccel", backend, c) for c in settings]
        if backend == "eager" and reference:
            for c in settings:
                why = None
                if importlib.util.find_spec("DeepCache") is None:
                    why = "not run: the DeepCache package is not installed (pip install DeepCache==0.1.1)"
                elif c.schedule != "uniform":
                    why = "not run: DeepCacheSDHelper has only the uniform schedule"
                cases.append(Case("reference", "eager", c, not_run=why))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# The run


class Bench:
    """State of one benchmark run: the pipeline, what has been measured so far, and where records go."""

    def __init__(self, args):
        self.args = args
        self._check_args()
        self.device = torch.device(args.device)
        self.steps = _unique(_int_items(args.steps, "--steps"))
        self.pipe, self.model_name, self.weights = self._load_pipeline()
        self._set_scheduler()
        self.loras = self._apply_loras()
        self.unet = self.pipe.unet  # the pipeline's own U-Net (while dcaccel is enabled, pipe.unet is its wrapper)
        self.vae_scale, self.text_len = int(self.pipe.vae_scale_factor), int(self.pipe.tokenizer.model_max_length)
        self.height = args.height or default_resolution(self.pipe)
        self.width = args.width or default_resolution(self.pipe)
        self.cfg = args.guidance > 1  # the pipelines batch [uncond, cond] exactly when guidance_scale > 1
        self.dtype = str(self.unet.dtype).removeprefix("torch.")
        self.settings = self._deepcache_settings()
        backends = args.backends or (["eager"] if args.sweep else list(BACKENDS))
        self.backends = _unique(backends)
        self.cases = plan(self.backends, self.settings, reference=not args.sweep and not args.no_reference)
        self.machine = machine_info()
        self.torch_threads = torch.get_num_threads()
        self.date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.out_dir = Path(args.out) if args.out else Path("benchmarks/results") / (
            f"{datetime.now():%Y-%m-%d}-{self.model_name}")
        self.memory = PeakMemory(self.device)
        self.outputs: dict[tuple[str, int], dict] = {}  # (backend or "baseline", steps) -> no-cache results
        self.flops: dict[int, dict] = {}
        self.builds: dict[tuple[str, int], dict] = {}
        self.records: list[dict] = []

    # -- setup ---------------------------------------------------------------------------------------------

    def _check_args(self):
        a = self.args
        if a.model is not None and a.arch is not None:
            raise ValueError("give --model (a local pipeline directory) or --arch, not both")
        for name in ("repeats", "batch"):
            if getattr(a, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(a, name)}")
        if a.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {a.warmup}")
        for name in ("height", "width"):
            v = getattr(a, name)
            if v is not None and (v <= 0 or v % 8):
                raise ValueError(f"--{name} must be a positive multiple of 8, got {v}")
        if a.sweep and a.max_rel_l2 is None and a.min_psnr is None:
            raise ValueError("--sweep needs a fidelity bound: --max-rel-l2 X and/or --min-psnr Y")
        if not a.sweep and (a.max_rel_l2 is not None or a.min_psnr is not None):
            raise ValueError("--max-rel-l2 / --min-psnr are bounds for --sweep")
        if a.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device")

    def _load_pipeline(self):
        a = self.args
        model = a.model if a.model is not None else (a.arch or "tiny")
        if model in ARCHITECTURES:
            pipe = build_pipeline(model, seed=0)
            name, weights = model, "random weights"
        else:
            pipe = load_pipeline(model)
            name, weights = ((model, "trained weights shipped in dcaccel/weights") if model in TRAINED
                             else (Path(model).resolve().name, f"weights from {model}"))
        return pipe.to(self.device), name, weights

    def _set_scheduler(self):
        import diffusers

        cls_name, extra = SCHEDULERS[self.args.scheduler]
        self.pipe.scheduler = getattr(diffusers, cls_name).from_config(self.pipe.scheduler.config, **extra)

    def _apply_loras(self):
        """Fuse the --lora files before anything is built or timed; a LoRA that does not fit is an error."""
        if not self.args.lora:
            return []
        from .lora import apply_loras, lora_record, parse_lora_argument

        specs = [parse_lora_argument(text) for text in self.args.lora]
        apply_loras(self.pipe, specs, fuse=True)
        return [{"path": str(spec.path), **record} for spec, record in zip(specs, lora_record(specs))]

    def _deepcache_settings(self) -> list[DeepCacheConfig]:
        a = self.args
        intervals = _int_items(a.interval, "--interval") if a.interval else list(SWEEP_INTERVALS if a.sweep else [3])
        branches = _int_items(a.branch, "--branch") if a.branch else list(SWEEP_BRANCHES if a.sweep else [0])
        schedules = a.schedule or list(BENCH_SCHEDULES if a.sweep else ["uniform"])
        n = num_branches(self.unet)
        if a.sweep and not a.branch:
            branches = [b for b in branches if b < n]
        bad = [b for b in branches if not 0 <= b < n]
        if bad:
            raise ValueError(f"--branch {bad} out of range: this U-Net has branches 0..{n - 1}")
        if 1 in intervals:
            logger.info("interval 1 is the no-cache run, measured for every backend anyway")
        return [DeepCacheConfig(interval=i, branch=b, schedule=s)
                for i in _unique(intervals) if i != 1 for b in _unique(branches) for s in _unique(schedules)]

    # -- one configuration ---------------------------------------------------------------------------------

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _call(self, steps: int):
        a = self.args

        def call():
            self._sync()
            out = self.pipe(prompt=a.prompt, height=self.height, width=self.width, num_inference_steps=steps,
                            guidance_scale=a.guidance, num_images_per_prompt=a.batch, output_type="latent",
                            generator=torch.Generator().manual_seed(a.seed)).images
            self._sync()
            return out

        return call

    def _build_config(self, backend: str, branch: int) -> BuildConfig:
        return BuildConfig(height=self.height, width=self.width, batch_size=self.args.batch, cfg=self.cfg,
                           dtype=self.dtype, branch=branch, backend=backend, device=self.device.type)

    def _engine(self, backend: str, branch: int) -> dict:
        """Build `backend`'s graphs for `branch` once per run (or find them in --engine-dir)."""
        key = (backend, branch)
        if key not in self.builds:
            start = time.perf_counter()
            try:
                directory, built = build_engines(self.pipe, self._build_config(backend, branch),
                                                 out_dir=self.engine_root, model_name=f"bench-{self.model_name}")
            except Exception as e:
                self.builds[key] = {"error": e}
            else:
                seconds = time.perf_counter() - start
                self.builds[key] = {
                    "engine_dir": directory,
                    "build_seconds": seconds if built else None,
                    "build_note": (f"{backend} build (export + check) for branch {branch}, once per run; shared by "
                                   "every configuration of that branch") if built else
                                  f"found a complete build in {directory}: not rebuilt",
                }
        if "error" in self.builds[key]:
            raise self.builds[key]["error"]
        return self.builds[key]

    @contextlib.contextmanager
    def _activated(self, case: Case):
        """The pipeline with `case` in effect; yields (take_stats, build info)."""
        if case.kind == "baseline":
            with UNetTimer(self.unet, self._sync) as timer:
                yield timer.take, {"build_note": "nothing to build"}
            return
        if case.kind == "reference":
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=self.pipe)
            helper.set_params(cache_interval=case.config.interval, cache_branch_id=case.config.branch)
            helper.enable()
            try:
                with UNetTimer(self.unet, self._sync) as timer:
                    yield timer.take, {"build_note": "nothing to build"}
            finally:
                helper.disable()
            return
        options, info = {}, {}
        if case.backend in ENGINE_BACKENDS:
            engine = self._engine(case.backend, case.config.branch)
            options["engine_dir"] = engine["engine_dir"]
            info.update(build_seconds=engine["build_seconds"], build_note=engine["build_note"])
            if case.backend == "onnxruntime":
                options["provider"] = "cuda" if self.device.type == "cuda" else "cpu"
                if self.args.threads:
                    options["threads"] = self.args.threads
        elif case.backend == "torch_compile":
            options.update(height=self.height, width=self.width, batch_size=self.args.batch, cfg=self.cfg)
        start = time.perf_counter()
        enable(self.pipe, case.config, backend=case.backend, **options)
        try:
            enable_seconds = time.perf_counter() - start
            runner = self.pipe.unet.runner
            if case.backend == "torch_compile":
                info.update(build_seconds=enable_seconds, compile_seconds=getattr(runner, "compile_seconds", None),
                            build_note="torch.compile of both graphs inside enable() (warm if inductor's caches "
                                       "already hold them)")
            elif case.backend == "eager":
                info["build_note"] = "nothing to build"
            info["enable_seconds"] = enable_seconds
            yield (lambda: last_stats(self.pipe)), info
        finally:
            disable(self.pipe)

    def _fidelity_ref(self, case: Case, steps: int) -> tuple[str, dict | None]:
        """The output this case's fidelity is measured against, and its name."""
        if case.kind == "baseline":
            return "-", None
        if case.is_no_cache:
            return "diffusers (no dcaccel)", self.outputs.get(("baseline", steps))
        return f"{case.backend}: no cache", self.outputs.get((case.backend, steps))

    def _sweep_check(self, case: Case, steps: int, holder: dict):
        a = self.args
        if not a.sweep or case.is_no_cache or case.kind == "baseline":
            return None
        ref = self._fidelity_ref(case, steps)[1]
        if ref is None:
            return None

        def check(latents):
            out = Output(latents, decode(self.pipe, latents))
            holder["output"], holder["fidelity"] = out, fidelity(out, ref["output"])
            fid = holder["fidelity"]
            if a.max_rel_l2 is not None and fid["latent_rel_l2"] > a.max_rel_l2:
                return f"not timed: latent rel L2 {fid['latent_rel_l2']:.4g} > bound {a.max_rel_l2}"
            if a.min_psnr is not None and not fid["images_identical"] and fid["psnr_db"] < a.min_psnr:
                return f"not timed: PSNR {fid['psnr_db']:.2f} dB < bound {a.min_psnr} dB"
            return None

        return check

    def run_case(self, case: Case, progress) -> None:
        if case.not_run:
            for steps in self.steps:
                self._emit(self._base_record(case, steps, status=case.not_run))
                progress.update(1)
            return
        done = set()
        try:
            with self._activated(case) as (take_stats, build_info):
                for steps in self.steps:
                    progress.set_postfix_str(f"{case.label}, {steps} steps")
                    try:
                        record = self._measure_one(case, steps, take_stats, build_info)
                    except Exception as e:
                        logger.exception("%s at %d steps failed", case.label, steps)
                        record = self._base_record(case, steps, status=f"failed: {type(e).__name__}: {e}")
                    self._emit(record)
                    done.add(steps)
                    progress.update(1)
        except Exception as e:
            prefix = "not run" if isinstance(e, MissingDependencyError) else "failed"
            if prefix == "failed":
                logger.exception("%s failed", case.label)
            for steps in self.steps:
                if steps not in done:
                    self._emit(self._base_record(case, steps, status=f"{prefix}: {type(e).__name__}: {e}"))
                    progress.update(1)
        gc.collect()

    def _measure_one(self, case: Case, steps: int, take_stats, build_info: dict) -> dict:
        a = self.args
        holder: dict = {}
        warmup = max(a.warmup, 1) if a.sweep else a.warmup  # the sweep checks fidelity on an untimed call
        m = measure(self._call(steps), take_stats, warmup, a.repeats, self.memory,
                    check=self._sweep_check(case, steps, holder))
        out = holder.get("output") or Output(m.latents, decode(self.pipe, m.latents))
        unet_median, pipe_median = _median(m.unet_seconds), _median(m.pipeline_seconds)
        if case.kind == "baseline" or case.is_no_cache:
            key = "baseline" if case.kind == "baseline" else case.backend
            self.outputs[(key, steps)] = {"output": out, "unet_median": unet_median, "pipeline_median": pipe_median}

        r = self._base_record(case, steps, status="ok")
        n_full = len(m.full_steps)
        n_shallow = m.num_evaluations - n_full
        r.update(
            num_evaluations=m.num_evaluations, n_full=n_full, n_shallow=n_shallow, full_steps=m.full_steps,
            timing_source="dcaccel StepStats" if case.kind == "dcaccel" else "forward hooks on the U-Net",
            not_timed=m.not_timed,
            unet_loop_median_s=unet_median, unet_loop_p90_s=_p90(m.unet_seconds),
            pipeline_median_s=pipe_median, pipeline_p90_s=_p90(m.pipeline_seconds),
            full_step_median_s=_median(m.full_seconds), shallow_step_median_s=_median(m.shallow_seconds),
            peak_mem_delta_mb=m.peak_mb, peak_mem_total_mb=m.peak_total_mb,
            memory_method=self.memory.method if m.peak_mb is not None else None,
            build_seconds=build_info.get("build_seconds"), compile_seconds=build_info.get("compile_seconds"),
            enable_seconds=build_info.get("enable_seconds"), build_note=build_info.get("build_note"),
        )
        # FLOPs and the bound they set for this schedule.
        branch = case.config.branch if case.config is not None else 0
        if branch not in self.flops:
            self.flops[branch] = graph_flops(self.unet, self._build_config("eager", branch), self.vae_scale,
                                             self.text_len)
        fl = self.flops[branch]
        r.update(flops_full=fl["full"], flops_shallow=fl["shallow"], flops_method=fl["method"],
                 flops_shallow_fraction=fl["shallow"] / fl["full"])
        if m.num_evaluations:
            r["theoretical_speedup"] = theoretical_speedup(m.num_evaluations, n_full, n_shallow, fl["full"],
                                                           fl["shallow"])
        # Fidelity: against the matching no-cache output, and against plain diffusers.
        vs, ref = self._fidelity_ref(case, steps)
        if ref is not None:
            r["fidelity_vs"] = vs
            r.update(holder.get("fidelity") or fidelity(out, ref["output"]))
        base = self.outputs.get(("baseline", steps))
        if base is not None and case.kind != "baseline":
            f = fidelity(out, base["output"])
            r.update(latent_rel_l2_vs_baseline=f["latent_rel_l2"], psnr_db_vs_baseline=f["psnr_db"])
        return r

    # -- records -------------------------------------------------------------------------------------------

    def _base_record(self, case: Case, steps: int, status: str) -> dict:
        a, c = self.args, case.config
        return {
            "kind": case.kind, "status": status, "label": case.label, "backend": case.backend,
            "cache": case.cache,
            "interval": c.interval if c is not None and case.kind != "baseline" else None,
            "branch": c.branch if c is not None and case.kind != "baseline" else None,
            "schedule": c.schedule if c is not None and case.kind != "baseline" else None,
            "model": self.model_name, "weights": self.weights, "height": self.height, "width": self.width,
            "batch": a.batch, "steps": steps, "guidance": a.guidance, "scheduler": a.scheduler,
            "prompt": a.prompt, "seed": a.seed, "dtype": self.dtype, "device": self.device.type,
            "threads": self.torch_threads, "ort_threads": a.threads, "repeats": a.repeats,
            "warmup": a.warmup, "loras": self.loras,
            "sweep": bool(a.sweep), "machine": self.machine, "date": self.date,
        }

    def _emit(self, record: dict) -> None:
        record = _finite(record)
        self.records.append(record)
        with open(self.out_dir / "results.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def header(self) -> dict:
        m, a = self.machine, self.args
        lora_text = ", ".join(f"{x['path']}:{x['scale']}" for x in self.loras) or "none"
        return {
            "date": self.date,
            "model": f"{self.model_name} ({self.weights}"
                     + ("; timings are those of the real architecture, images are noise)"
                        if self.weights == "random weights" else ")"),
            "machine": f"{m['cpu']}, {m['cores_usable']} of {m['cores']} cores usable, {m['platform']}"
                       + (f", {m['cuda_device']}" if m["cuda_device"] else ""),
            "versions": ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
            "settings": (f"{self.height}x{self.width}, batch {a.batch}, guidance {a.guidance}, scheduler "
                         f"{a.scheduler}, steps {', '.join(map(str, self.steps))}, repeats {a.repeats}, "
                         f"warm-up {a.warmup}, torch threads {self.torch_threads}, ONNX Runtime threads "
                         f"{a.threads or 'default'}, seed {a.seed}, dtype {self.dtype}, device {self.device.type}, "
                         f"LoRA {lora_text}"
                         ),
            "memory": self.memory.method,
        }

    def run(self) -> list[dict]:
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.jsonl").write_text("")
        logger.info("writing to %s", self.out_dir)
        with contextlib.ExitStack() as stack:
            if self.args.engine_dir:
                self.engine_root = Path(self.args.engine_dir)
            else:
                self.engine_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dcaccel-bench-")))
            total = len(self.cases) * len(self.steps)
            with tqdm(total=total, desc="dcaccel bench", unit="run", disable=self.args.no_progress) as progress:
                for case in self.cases:
                    self.run_case(case, progress)
                    derive_speedups(self.records)
                    write_markdown(self.records, self.out_dir / "results.md", self.header(),
                                   recommend(self.records, self.args) if self.args.sweep else None)
        derive_speedups(self.records)
        with open(self.out_dir / "results.jsonl", "w") as f:  # again, now with the derived fields
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in self.records)
        recs = recommend(self.records, self.args) if self.args.sweep else []
        write_markdown(self.records, self.out_dir / "results.md", self.header(), recs or None)
        if self.args.sweep:
            (self.out_dir / "recommendation.json").write_text(json.dumps(recs, indent=1, allow_nan=False) + "\n")
        self.plot_note = write_plot(self.records, self.out_dir / "results.png", self.header())
        return self.records + recs


# ----------------------------------------------------------------------------------------------------------------
# Fields derived across records


def derive_speedups(records: list[dict]) -> list[dict]:
    """Fill in the ratios between records of one run, per step count: speedup of the U-Net loop and of the
    pipeline call over eager's no-cache run, speedup of the U-Net loop over the same backend's no-cache run
    (eager's for the reference helper), and achieved = that speedup / theoretical. Returns `records`."""
    def key(r):
        return r["kind"], r["backend"], r.get("interval"), r["steps"]

    by_key = {key(r): r for r in records if r.get("status") == "ok" and r.get("unet_loop_median_s") is not None}
    for r in records:
        if r.get("status") != "ok" or r.get("kind") == "recommendation":
            continue
        eager = by_key.get(("dcaccel", "eager", 1, r["steps"]))
        if eager is not None:
            r["speedup_unet_vs_eager"] = _ratio(eager["unet_loop_median_s"], r.get("unet_loop_median_s"))
            r["speedup_pipeline_vs_eager"] = _ratio(eager["pipeline_median_s"], r.get("pipeline_median_s"))
        if r["kind"] == "baseline" or r.get("interval") == 1:
            continue
        own = by_key.get(("dcaccel", r["backend"], 1, r["steps"]))
        if own is not None and r.get("unet_loop_median_s") is not None:
            r["speedup_unet_vs_own_no_cache"] = _ratio(own["unet_loop_median_s"], r["unet_loop_median_s"])
            if r.get("theoretical_speedup"):
                r["achieved_fraction"] = r["speedup_unet_vs_own_no_cache"] / r["theoretical_speedup"]
    return records


# ----------------------------------------------------------------------------------------------------------------
# Sweep recommendation


def recommend(records: list[dict], args) -> list[dict]:
    """Per backend and step count: the fastest (U-Net loop median) cached setting within the fidelity bound."""
    bound = {"max_rel_l2": args.max_rel_l2, "min_psnr_db": args.min_psnr}
    out = []
    groups = {}
    for r in records:
        if r["kind"] == "dcaccel" and r["status"] == "ok" and r.get("interval", 1) != 1:
            groups.setdefault((r["backend"], r["steps"]), []).append(r)
    for (backend, steps), rows in groups.items():
        def within(r):
            if r.get("latent_rel_l2") is None:
                return False
            if args.max_rel_l2 is not None and r["latent_rel_l2"] > args.max_rel_l2:
                return False
            if args.min_psnr is not None and not r.get("images_identical") and r["psnr_db"] < args.min_psnr:
                return False
            return True

        ok = [r for r in rows if within(r) and r.get("unet_loop_median_s") is not None]
        rec = {"kind": "recommendation", "model": rows[0]["model"], "weights": rows[0]["weights"],
               "backend": backend, "steps": steps, "height": rows[0]["height"], "width": rows[0]["width"],
               "scheduler": rows[0]["scheduler"], "bound": bound, "tried": len(rows), "within_bound": len(ok)}
        if ok:
            best = min(ok, key=lambda r: r["unet_loop_median_s"])
            rec.update({k: best.get(k) for k in (
                "interval", "branch", "schedule", "unet_loop_median_s", "pipeline_median_s",
                "speedup_unet_vs_own_no_cache", "speedup_unet_vs_eager", "theoretical_speedup", "latent_rel_l2",
                "psnr_db", "ssim")})
            rec["recommendation"] = (f"interval {best['interval']}, branch {best['branch']}, {best['schedule']}")
        else:
            rec["recommendation"] = "none of the tried settings stays within the bound: run without DeepCache"
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Markdown and plot


def _fmt(v, spec=".3f", none="-"):
    if v is None:
        return none
    return format(v, spec)


def _fmt_time(median, p90):
    return "-" if median is None else f"{median:.3f} ({p90:.3f})"


def markdown_table(records: list[dict], steps: int) -> str:
    head = ["configuration", "U-Net loop s median (p90)", "pipeline s median (p90)", "full step ms",
            "shallow step ms", "speedup vs eager U-Net / pipeline", "vs own no-cache", "theoretical", "achieved",
            "fidelity vs", "latent rel L2", "PSNR dB", "SSIM", "peak mem MiB: +delta (total)", "build s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.get("steps") != steps or r.get("kind") == "recommendation":
            continue
        ms = (lambda v: _fmt(v * 1e3 if v is not None else None, ".1f"))
        speed = "-" if r.get("speedup_unet_vs_eager") is None else (
            f"{r['speedup_unet_vs_eager']:.2f}x / {_fmt(r.get('speedup_pipeline_vs_eager'), '.2f')}x")
        psnr_txt = "inf" if r.get("images_identical") else _fmt(r.get("psnr_db"), ".2f")
        status = r["status"] if r["status"] != "ok" else (r.get("not_timed") or "ok")
        cells = [
            r["label"], _fmt_time(r.get("unet_loop_median_s"), r.get("unet_loop_p90_s")),
            _fmt_time(r.get("pipeline_median_s"), r.get("pipeline_p90_s")),
            ms(r.get("full_step_median_s")), ms(r.get("shallow_step_median_s")), speed,
            _fmt(r.get("speedup_unet_vs_own_no_cache"), ".2f") + ("x" if r.get("speedup_unet_vs_own_no_cache") else ""),
            _fmt(r.get("theoretical_speedup"), ".2f") + ("x" if r.get("theoretical_speedup") else ""),
            _fmt(r.get("achieved_fraction"), ".0%"), r.get("fidelity_vs", "-") if r["status"] == "ok" else "-",
            _fmt(r.get("latent_rel_l2"), ".2e"), psnr_txt, _fmt(r.get("ssim"), ".4f"),
            "-" if r.get("peak_mem_delta_mb") is None else
            f"+{r['peak_mem_delta_mb']:.1f} ({r['peak_mem_total_mb']:.0f})",
            _fmt(r.get("build_seconds"), ".1f"), status,
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_markdown(records: list[dict], path: Path, header: dict, recommendations: list[dict] | None = None) -> None:
    steps = _unique(r["steps"] for r in records if "steps" in r)
    parts = [
        "# dcaccel benchmark",
        "",
        f"- date: {header['date']}",
        f"- model: {header['model']}",
        f"- machine: {header['machine']}",
        f"- versions: {header['versions']}",
        f"- settings: {header['settings']}",
        f"- memory: {header['memory']}",
        "",
        "U-Net loop: the summed time of the U-Net evaluations of one call. Speedups divide medians measured in "
        "this run. theoretical: N*F_full / (n_full*F_full + n_shallow*F_shallow) from FLOP counts of the two "
        "graphs for the schedule that ran; achieved: the speedup over the same backend's no-cache run divided by "
        "it. Fidelity: against the row named in 'fidelity vs' (same seed), latents and decoded images. "
        "Build time is reported apart and never included in a timing. See benchmarks/README.md.",
    ]
    for n in steps:
        parts += ["", f"## {n} steps", "", markdown_table(records, n)]
    if recommendations:
        parts += ["", "## Recommendation (sweep)", ""]
        for rec in recommendations:
            extra = "" if rec.get("interval") is None else (
                f": U-Net loop {rec['unet_loop_median_s']:.3f} s, {rec['speedup_unet_vs_own_no_cache']:.2f}x over "
                f"{rec['backend']} without cache, latent rel L2 {rec['latent_rel_l2']:.3g}, PSNR "
                f"{_fmt(rec['psnr_db'], '.2f', 'inf')} dB")
            parts.append(f"- {rec['backend']}, {rec['steps']} steps, bound {_bound_text(rec['bound'])}: "
                         f"**{rec['recommendation']}**{extra} ({rec['within_bound']} of {rec['tried']} within)")
    path.write_text("\n".join(parts) + "\n")


def _bound_text(bound: dict) -> str:
    parts = []
    if bound.get("max_rel_l2") is not None:
        parts.append(f"latent rel L2 <= {bound['max_rel_l2']}")
    if bound.get("min_psnr_db") is not None:
        parts.append(f"PSNR >= {bound['min_psnr_db']} dB")
    return " and ".join(parts)


def write_plot(records: list[dict], path: Path, header: dict) -> str:
    """Speedup over eager's no-cache run against PSNR, one point per cached configuration. Returns a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'dcaccel[bench]')"
    points = [r for r in records if r.get("status") == "ok" and r.get("psnr_db") is not None
              and r.get("speedup_unet_vs_eager") is not None and r.get("interval") not in (None, 1)]
    if not points:
        return "plot skipped: no cached configuration with both a speedup and a finite PSNR"
    several_steps = len({r["steps"] for r in points}) > 1
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"eager": "o", "torch_compile": "s", "onnxruntime": "^", "tensorrt": "D"}
    for backend in _unique(("reference" if r["kind"] == "reference" else r["backend"]) for r in points):
        rows = [r for r in points if ("reference" if r["kind"] == "reference" else r["backend"]) == backend]
        ax.scatter([r["psnr_db"] for r in rows], [r["speedup_unet_vs_eager"] for r in rows],
                   marker=markers.get(backend, "x"), label=backend)
        for r in rows:
            text = f"{backend} i{r['interval']} b{r['branch']}" + (" nu" if r["schedule"] == "nonuniform" else "")
            text += f" {r['steps']}st" if several_steps else ""
            ax.annotate(text, (r["psnr_db"], r["speedup_unet_vs_eager"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.ticklabel_format(useOffset=False)
    lo, hi = min(r["psnr_db"] for r in points), max(r["psnr_db"] for r in points)
    ax.set_xlim(min(lo - 1, (lo + hi) / 2 - 5), max(hi + 1, (lo + hi) / 2 + 5))
    ax.set_xlabel("PSNR of decoded image vs the same backend without cache (dB)")
    ax.set_ylabel("U-Net loop speedup vs eager without cache")
    ax.set_title(f"{header['model'].split(' (')[0]}: speedup vs fidelity", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written: {path}"


# ----------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dcaccel bench` (and benchmarks/run.py)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="local diffusers pipeline directory (or an embedded architecture name)")
    model.add_argument("--arch", choices=ARCHITECTURES,
                       help="embedded architecture with random weights (default tiny when no --model)")
    model.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                       help="fuse this LoRA first, via dcaccel.lora (repeatable)")
    model.add_argument("--device", choices=("cpu", "cuda"), default="cpu")

    matrix = parser.add_argument_group("matrix")
    matrix.add_argument("--backends", nargs="+", choices=BACKENDS,
                        help="default: all (tensorrt gives a 'not run' row without CUDA/TensorRT); "
                             "eager only with --sweep. Eager's no-cache run is always measured.")
    matrix.add_argument("--interval", nargs="+", metavar="N",
                        help="DeepCache intervals (default 3; sweep: 2 3 4 5)")
    matrix.add_argument("--branch", nargs="+", metavar="B", help="skip branches (default 0; sweep: 0 1 2)")
    matrix.add_argument("--schedule", nargs="+", choices=BENCH_SCHEDULES,
                        help="default uniform; sweep: uniform nonuniform")
    matrix.add_argument("--no-reference", action="store_true", help="skip the DeepCacheSDHelper rows")

    call = parser.add_argument_group("pipeline call")
    call.add_argument("--height", type=int, help="default: the model's default resolution")
    call.add_argument("--width", type=int)
    call.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    call.add_argument("--steps", nargs="+", default=["20"], metavar="N", help="denoising steps (default 20); "
                      "several give one table each")
    call.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    call.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    call.add_argument("--prompt", default=DEFAULT_PROMPT)
    call.add_argument("--seed", type=int, default=0, help="noise seed; the same for every call")

    timing = parser.add_argument_group("timing and output")
    timing.add_argument("--threads", type=int, help="torch.set_num_threads and ONNX Runtime intra-op threads")
    timing.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (default 3)")
    timing.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    timing.add_argument("--out", help="output directory (default benchmarks/results/<date>-<model>/)")
    timing.add_argument("--engine-dir", help="keep engine builds here and reuse matching ones (default: a "
                                             "temporary directory, removed at the end)")
    timing.add_argument("--no-progress", action="store_true", help="no progress bar")
    timing.add_argument("--quiet", action="store_true", help="print nothing at the end (files are still written)")

    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true",
                       help="try intervals x branches x schedules and recommend the fastest within the bound")
    sweep.add_argument("--max-rel-l2", type=float, help="bound: latent relative L2 vs no cache")
    sweep.add_argument("--min-psnr", type=float, help="bound: PSNR (dB) of the decoded image vs no cache")


def run(args) -> list[dict]:
    """Run the benchmark `args` describe; write results.jsonl/.md/.png (and recommendation.json) and print a
    summary unless args.quiet. Returns the records, then (sweep) the recommendations (kind 'recommendation')."""
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        bench = Bench(args)
        records = bench.run()
    finally:
        torch.set_num_threads(threads_before)
    if not getattr(args, "quiet", False):
        _print_summary(bench, records)
    return records


def _print_summary(bench: Bench, records: list[dict]) -> None:
    header = bench.header()
    print(f"\ndcaccel bench: {header['model']}")
    print(f"machine: {header['machine']}\nsettings: {header['settings']}")
    for n in bench.steps:
        print(f"\n{n} steps\n" + markdown_table(records, n))
    for rec in (r for r in records if r["kind"] == "recommendation"):
        print(f"\nrecommended for {rec['backend']}, {rec['steps']} steps ({_bound_text(rec['bound'])}): "
              f"{rec['recommendation']}")
    print(f"\n{bench.plot_note}")
    print(f"results: {bench.out_dir}/results.jsonl, results.md" + (", recommendation.json" if bench.args.sweep else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcaccel bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        run(args)
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
