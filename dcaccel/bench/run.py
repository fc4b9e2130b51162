"""One benchmark run: load the pipeline, plan, warm every configuration up once, then time them in interleaved
rounds (each round runs every configuration once, in plan order), and make one record per configuration and
step count."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..config import BuildConfig, DeepCacheConfig
from ..engines import ENGINE_BACKENDS, build_engines, open_runner
from ..errors import MissingDependencyError
from ..families import family_of_pipeline
from ..graphs.spec import dtype_name
from ..models import ARCHITECTURES, TRAINED, build_pipeline, default_resolution, load_pipeline
from ..pipeline import attach, disable, last_stats
from .fidelity import Output, decode, fidelity
from .flops import graph_flops, theoretical_speedup
from .memory import PeakMemory
from .plan import Case, plan
from .report import derive_speedups, recommend, write_markdown, write_plot
from .timing import HookTimer, Measurement, median, p90, timed

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "torch_compile", "onnxruntime", "tensorrt")
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
BENCH_SCHEDULES = ("uniform", "nonuniform")
SWEEP_INTERVALS = (2, 3, 4, 5)
SWEEP_BRANCHES = (0, 1, 2)
SWEEP_HEADS = SWEEP_TAILS = (0, 1, 2)
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
NO_CACHE = DeepCacheConfig(interval=1)  # the whole model as the backend's full graph, every step


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
        "versions": {pkg: version(pkg) for pkg in ("torch", "diffusers", "onnxruntime", "DeepCache", "cache-dit",
                                                   "dcaccel")},
    }


def int_items(values, what) -> list[int]:
    out = []
    for v in values:
        for item in str(v).split(","):
            if item.strip():
                try:
                    out.append(int(item))
                except ValueError:
                    raise ValueError(f"{what} takes integers (space- or comma-separated), got {item!r}") from None
    return out


def unique(xs):
    return list(dict.fromkeys(xs))


def _finite(record: dict) -> dict:
    """NaN or inf (a broken backend's output, say) become None, listed in `non_finite`: JSON stays valid."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    logger.warning("%s: non-finite %s", record.get("label"), bad)
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "non_finite": bad}


class Bench:
    """State of one benchmark run: the pipeline, what has been measured so far, and where records go."""

    def __init__(self, args):
        self.args = args
        self._check_args()
        self.device = torch.device(args.device)
        self.steps = unique(int_items(args.steps, "--steps"))
        self.pipe, self.model_name, self.weights = self._load_pipeline()
        self.family = family_of_pipeline(self.pipe)
        self.denoiser = getattr(self.pipe, self.family.denoiser_attr)  # the original, also while dcaccel runs
        # a ControlNet pipeline's own steps run the ControlNet, then the U-Net: both are the step's time
        self._before = (self.pipe.controlnet,) if getattr(self.pipe, "controlnet", None) is not None else ()
        self.model = self.family.denoiser(self.pipe)  # what is cut: the denoiser (with its ControlNets)
        self.scheduler_name = self._set_scheduler()
        self.loras = self._apply_loras()
        self.geometry = self.family.geometry(self.pipe)
        self.height = args.height or default_resolution(self.pipe)
        self.width = args.width or default_resolution(self.pipe)
        self.guidance = args.guidance if args.guidance is not None else (
            7.0 if self.family.name == "mmdit" else 7.5)
        self.cfg = self.guidance > 1  # the pipelines batch [uncond, cond] exactly when guidance_scale > 1
        self.dtype = dtype_name(self.denoiser.dtype)
        self.settings = self._deepcache_settings()
        backends = args.backends or (["eager"] if args.sweep else list(BACKENDS))
        self.backends = unique(backends)
        self.cases = plan(self.backends, self.settings, NO_CACHE, self.family.name,
                          reference=not args.sweep and not args.no_reference, peers=args.peers)
        self.machine = machine_info()
        self.torch_threads = torch.get_num_threads()
        self.date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.out_dir = Path(args.out) if args.out else Path("benchmarks/results") / (
            f"{datetime.now():%Y-%m-%d}-{self.model_name}")
        self.memory = PeakMemory(self.device)
        self.measurements: dict[tuple[Case, int], Measurement] = {}
        self.failures: dict[tuple[Case, int], str] = {}
        self.build_info: dict[Case, dict] = {}
        self.outputs: dict[tuple[str, int], Output] = {}  # (backend or "baseline", steps) -> no-cache output
        self.flops: dict[tuple, dict] = {}
        self.builds: dict[tuple, dict] = {}
        self.kept: dict[tuple, tuple] = {}  # (backend, cut) -> (runner, info), reused across rounds
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
        if a.controlnets and model not in ARCHITECTURES:
            raise ValueError("--controlnets builds random ControlNets for an embedded architecture (--arch)")
        if model in ARCHITECTURES:
            pipe = build_pipeline(model, seed=0, controlnets=a.controlnets)
            name, weights = model + (f"-controlnet{a.controlnets}" if a.controlnets else ""), "random weights"
        else:
            pipe = load_pipeline(model)
            name, weights = ((model, "trained weights shipped in dcaccel/weights") if model in TRAINED
                             else (Path(model).resolve().name, f"weights from {model}"))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device), name, weights

    def _set_scheduler(self) -> str:
        import diffusers

        if self.args.scheduler:
            if self.family.name != "unet":
                raise ValueError(f"--scheduler is for U-Net models; SD 3.x keeps its "
                                 f"{type(self.pipe.scheduler).__name__}")
            cls_name, extra = SCHEDULERS[self.args.scheduler]
            self.pipe.scheduler = getattr(diffusers, cls_name).from_config(self.pipe.scheduler.config, **extra)
        return type(self.pipe.scheduler).__name__

    def _apply_loras(self):
        """Fuse the --lora files before anything is built or timed; a LoRA that does not fit is an error."""
        if not self.args.lora:
            return []
        from ..lora import apply_loras, lora_record, parse_lora_argument

        specs = [parse_lora_argument(text) for text in self.args.lora]
        apply_loras(self.pipe, specs, fuse=True)
        return [{"path": str(spec.path), **record} for spec, record in zip(specs, lora_record(specs))]

    def _deepcache_settings(self) -> list[DeepCacheConfig]:
        a = self.args
        intervals = int_items(a.interval, "--interval") if a.interval else list(SWEEP_INTERVALS if a.sweep else [3])
        schedules = a.schedule or list(BENCH_SCHEDULES if a.sweep else ["uniform"])
        if self.family.name in ("unet", "controlnet"):
            if a.head_blocks or a.tail_blocks:
                raise ValueError("--head-blocks/--tail-blocks cut a transformer; this model is a U-Net: use --branch")
            from ..families.unet import num_branches

            branches = int_items(a.branch, "--branch") if a.branch else list(SWEEP_BRANCHES if a.sweep else [0])
            n = num_branches(self.denoiser)
            if a.sweep and not a.branch:
                branches = [b for b in branches if b < n]
            bad = [b for b in branches if not 0 <= b < n]
            if bad:
                raise ValueError(f"--branch {bad} out of range: this U-Net has branches 0..{n - 1}")
            cuts = [{"branch": b} for b in unique(branches)]
            if self.family.name == "controlnet":
                whole = {"cut": [True], "whole": [False], "both": [True, False]}[a.controlnet_cut]
                cuts = [{**c, "cut_controlnet": w} for c in cuts for w in whole]
        else:
            if a.branch:
                raise ValueError("--branch cuts a U-Net; this model is a transformer: use --head-blocks/--tail-blocks")
            from ..families.mmdit import num_blocks

            heads = int_items(a.head_blocks, "--head-blocks") if a.head_blocks else list(SWEEP_HEADS if a.sweep else [1])
            tails = int_items(a.tail_blocks, "--tail-blocks") if a.tail_blocks else list(SWEEP_TAILS if a.sweep else [1])
            n = num_blocks(self.denoiser)
            bad = [(h, t) for h in heads for t in tails if h < 0 or t < 0 or h + t >= n]
            if bad and not a.sweep:
                raise ValueError(f"--head-blocks/--tail-blocks {bad} out of range: head + tail must be < {n}")
            cuts = [{"head_blocks": h, "tail_blocks": t} for h in unique(heads) for t in unique(tails)
                    if (h, t) not in bad]
        if 1 in intervals:
            logger.info("interval 1 is the no-cache run, measured for every backend anyway")
        return [DeepCacheConfig(interval=i, schedule=s, **cut)
                for i in unique(intervals) if i != 1 for cut in cuts for s in unique(schedules)]

    # -- activating a configuration ------------------------------------------------------------------------

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _control_images(self) -> dict:
        """Conditioning images for a ControlNet pipeline (noise, seeded: speed does not depend on them)."""
        if self.family.name != "controlnet":
            return {}
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(self.args.seed)
        images = [Image.fromarray(rng.integers(0, 255, (self.height, self.width, 3), dtype=np.uint8))
                  for _ in range(self.args.controlnets)]
        return {"image": images if len(images) > 1 else images[0]}

    def _call(self, steps: int):
        a = self.args
        extra = self._control_images()

        def call():
            self._sync()
            out = self.pipe(prompt=a.prompt, height=self.height, width=self.width, num_inference_steps=steps,
                            guidance_scale=self.guidance, num_images_per_prompt=a.batch, output_type="latent",
                            generator=torch.Generator().manual_seed(a.seed), **extra).images
            self._sync()
            return out

        return call

    def _cut(self, config: DeepCacheConfig) -> dict:
        return self.family.resolve_cut(self.model, config)

    def _build_config(self, backend: str, cut: dict) -> BuildConfig:
        return BuildConfig(height=self.height, width=self.width, batch_size=self.args.batch, cfg=self.cfg,
                           dtype=self.dtype, backend=backend, device=self.device.type, **cut)

    def _deep_module(self, cut: dict) -> torch.nn.Module:
        """A module only a full step runs: the U-Net's mid block, a transformer's first middle block."""
        if self.family.name != "mmdit":
            return self.denoiser.mid_block.resnets[0]
        return self.denoiser.transformer_blocks[cut["head_blocks"]]

    def _engine(self, backend: str, cut: dict) -> dict:
        """Build `backend`'s graphs for `cut` once per run (or find them in --engine-dir)."""
        key = (backend, tuple(sorted(cut.items())))
        if key not in self.builds:
            start = time.perf_counter()
            try:
                directory, built = build_engines(self.pipe, self._build_config(backend, cut),
                                                 out_dir=self.engine_root, model_name=f"bench-{self.model_name}")
            except Exception as e:
                self.builds[key] = {"error": e}
            else:
                self.builds[key] = {
                    "engine_dir": directory,
                    "build_seconds": time.perf_counter() - start if built else None,
                    "build_note": (f"{backend} build (export + check against eager) for "
                                   f"{self.family.cut_text(cut)}, once per run; shared by every configuration "
                                   "with that cut") if built else f"found a complete build in {directory}: not rebuilt",
                }
        if "error" in self.builds[key]:
            raise self.builds[key]["error"]
        return self.builds[key]

    def _runner(self, case: Case) -> tuple:
        """(runner, info, build info) for a dcaccel case: kept from an earlier round, or opened now."""
        cut = self._cut(case.config)
        key = (case.backend, tuple(sorted(cut.items())))
        if key in self.kept:
            runner, info = self.kept[key]
            return runner, info, {}
        options, build = {}, {}
        if case.backend in ENGINE_BACKENDS and case.backend != "torch_compile":
            engine = self._engine(case.backend, cut)
            options["engine_dir"] = engine["engine_dir"]
            build.update(build_seconds=engine["build_seconds"], build_note=engine["build_note"])
            if case.backend == "onnxruntime":
                options["provider"] = "cuda" if self.device.type == "cuda" else "cpu"
                if self.args.threads:
                    options["threads"] = self.args.threads
        elif case.backend == "torch_compile":
            options.update(height=self.height, width=self.width, batch_size=self.args.batch, cfg=self.cfg)
            if getattr(self.args, "compile_freezing", None):
                options["freezing"] = self.args.compile_freezing == "on"
        start = time.perf_counter()
        runner, info = open_runner(self.pipe, case.config, case.backend, **options)
        seconds = time.perf_counter() - start
        if case.backend == "torch_compile":
            build.update(build_seconds=seconds, compile_seconds=getattr(runner, "compile_seconds", None),
                         build_note="torch.compile of both graphs when the runner was made (warm if inductor's "
                                    "caches already held them)")
        elif case.backend == "eager":
            build["build_note"] = "nothing to build"
        build["open_seconds"] = seconds
        if self.args.keep_runners:
            self.kept[key] = (runner, info)
        return runner, info, build

    @contextlib.contextmanager
    def _activated(self, case: Case, steps: int):
        """The pipeline with `case` in effect; yields (take_stats, build info)."""
        if case.kind == "baseline":
            cut = self._cut(NO_CACHE)
            with HookTimer(self.denoiser, self._deep_module(cut), self._sync, self._before) as timer:
                yield timer.take, {"build_note": "nothing to build"}
            return
        if case.kind == "reference":
            with self._peer(case, steps) as activated:
                yield activated
            return
        runner, info, build = self._runner(case)
        attach(self.pipe, case.config, case.backend, runner, info)
        try:
            yield (lambda: last_stats(self.pipe)), build
        finally:
            disable(self.pipe, close=not self.args.keep_runners)

    @contextlib.contextmanager
    def _peer(self, case: Case, steps: int):
        c = case.config
        cut = self._cut(c)
        if case.peer == "deepcache":
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=self.pipe)
            helper.set_params(cache_interval=c.interval, cache_branch_id=cut["branch"])
            helper.enable()
            try:
                with HookTimer(self.denoiser, self._deep_module(cut), self._sync, self._before) as timer:
                    yield timer.take, {"build_note": "nothing to build"}
            finally:
                helper.disable()
            return
        # cache-dit's DBCache with the same cut and a static mask of our schedule's full steps
        import cache_dit
        from cache_dit import DBCacheConfig

        from ..schedule import full_step_mask

        mask = [int(f) for f in full_step_mask(c, steps)]
        cache_dit.enable_cache(self.pipe, cache_config=DBCacheConfig(
            Fn_compute_blocks=cut["head_blocks"], Bn_compute_blocks=cut["tail_blocks"],
            steps_computation_mask=mask, steps_computation_policy="static"))
        compiled = None
        try:
            build = {"build_note": "nothing to build"}
            if case.peer == "cache-dit+compile":
                self.denoiser.compile(dynamic=False)  # in place (Module.compile); undone below
                compiled = True
                build = {"build_note": "transformer.compile() after cache_dit.enable_cache, compiled lazily during "
                                       "the untimed first call; every round makes one untimed call before its timed "
                                       "one, as cache-dit's hooks are installed again per round"}
            with HookTimer(self.denoiser, self._deep_module(cut), self._sync, self._before) as timer:
                def take():
                    stats = timer.take()
                    return _stats_from_mask(stats, mask) if compiled is not None else stats
                yield take, build
        finally:
            if compiled is not None:
                self.denoiser._compiled_call_impl = None  # back to the plain module for the other rows
            cache_dit.disable_cache(self.pipe)

    # -- measuring --------------------------------------------------------------------------------------------

    def _sweep_check(self, case: Case, steps: int, out: Output) -> str | None:
        a = self.args
        if not a.sweep or case.is_no_cache or case.kind == "baseline":
            return None
        ref = self._fidelity_ref(case, steps)[1]
        if ref is None:
            return None
        fid = fidelity(out, ref)
        if a.max_rel_l2 is not None and fid["latent_rel_l2"] > a.max_rel_l2:
            return f"not timed: latent rel L2 {fid['latent_rel_l2']:.4g} > bound {a.max_rel_l2}"
        if a.min_psnr is not None and not fid["images_identical"] and fid["psnr_db"] < a.min_psnr:
            return f"not timed: PSNR {fid['psnr_db']:.2f} dB < bound {a.min_psnr} dB"
        return None

    def _fidelity_ref(self, case: Case, steps: int) -> tuple[str, Output | None]:
        """The output this case's fidelity is measured against, and its name."""
        if case.kind == "baseline":
            return "-", None
        if case.is_no_cache:
            return "diffusers (no dcaccel)", self.outputs.get(("baseline", steps))
        backend = "eager" if case.kind == "reference" else case.backend
        return f"{backend}: no cache", self.outputs.get((backend, steps))

    def _warm_up(self, case: Case, progress) -> None:
        """Per step count: the first (untimed) call gives the latents; further --warmup calls are untimed too."""
        try:
            for steps in self.steps:
                progress.set_postfix_str(f"warm-up: {case.label}, {steps} steps")
                m = Measurement()
                try:
                    with self._activated(case, steps) as (take_stats, build), self.memory:
                        latents, _, stats = timed(self._call(steps), take_stats)
                        for _ in range(self.args.warmup - 1):
                            timed(self._call(steps), take_stats)
                    self.build_info.setdefault(case, build)
                except Exception as e:
                    if isinstance(e, MissingDependencyError):
                        raise
                    logger.exception("%s at %d steps failed", case.label, steps)
                    self.failures[(case, steps)] = f"failed: {type(e).__name__}: {e}"
                    continue
                m.latents, m.full_steps = latents, list(stats.full_steps)
                m.num_evaluations = len(stats.full_steps) + len(stats.shallow_steps)
                m.peak_mb, m.peak_total_mb = self.memory.peak_mb, self.memory.peak_total_mb
                out = Output(latents, decode(self.pipe, latents))
                m.output = out
                if case.kind == "baseline" or case.is_no_cache:
                    self.outputs[("baseline" if case.kind == "baseline" else case.backend, steps)] = out
                m.not_timed = self._sweep_check(case, steps, out)
                self.measurements[(case, steps)] = m
                self._checkpoint({"phase": "warm-up", "config": case.label, "steps": steps,
                                  "peak_mem_total_mb": m.peak_total_mb, "peak_mem_delta_mb": m.peak_mb, **(build or {})})
        except MissingDependencyError as e:
            for steps in self.steps:
                self.failures[(case, steps)] = f"not run: {e}"
        progress.update(1)

    def _round(self, case: Case, progress) -> None:
        for steps in self.steps:
            m = self.measurements.get((case, steps))
            if m is None or m.not_timed:
                continue
            progress.set_postfix_str(f"{case.label}, {steps} steps")
            try:
                with self._activated(case, steps) as (take_stats, _):
                    if case.peer == "cache-dit+compile":
                        timed(self._call(steps), take_stats)  # untimed: recompiles what the new hooks changed
                    _, seconds, stats = timed(self._call(steps), take_stats)
            except Exception as e:
                logger.exception("%s at %d steps failed", case.label, steps)
                self.failures[(case, steps)] = f"failed: {type(e).__name__}: {e}"
                del self.measurements[(case, steps)]
                continue
            m.add(seconds, stats)
            self._checkpoint({"phase": "round", "config": case.label, "steps": steps, "pipeline_s": seconds,
                              "denoiser_loop_s": stats.denoiser_seconds})
        progress.update(1)

    def _checkpoint(self, row: dict) -> None:
        """What was measured so far, one line per warm-up and per timed call, written as it happens: a run killed
        part-way (for memory, by a time limit) still leaves its measurements in partial.jsonl."""
        try:
            with open(self.out_dir / "partial.jsonl", "a") as f:
                f.write(json.dumps(_finite(row), default=str) + "\n")
        except OSError:
            logger.exception("writing partial.jsonl failed")

    def _record(self, case: Case, steps: int) -> dict:
        if case.not_run:
            return self._base_record(case, steps, case.not_run)
        if (case, steps) in self.failures:
            return self._base_record(case, steps, self.failures[(case, steps)])
        m = self.measurements[(case, steps)]
        build = self.build_info.get(case, {})
        r = self._base_record(case, steps, status="ok")
        n_full = len(m.full_steps)
        n_shallow = m.num_evaluations - n_full
        r.update(
            num_evaluations=m.num_evaluations, n_full=n_full, n_shallow=n_shallow, full_steps=m.full_steps,
            timing_source="dcaccel StepStats" if case.kind == "dcaccel" else "forward hooks on the denoiser",
            not_timed=m.not_timed, timed_calls=len(m.pipeline_seconds),
            denoiser_loop_median_s=median(m.denoiser_seconds), denoiser_loop_p90_s=p90(m.denoiser_seconds),
            pipeline_median_s=median(m.pipeline_seconds), pipeline_p90_s=p90(m.pipeline_seconds),
            full_step_median_s=median(m.full_seconds), shallow_step_median_s=median(m.shallow_seconds),
            peak_mem_delta_mb=m.peak_mb, peak_mem_total_mb=m.peak_total_mb,
            memory_method=self.memory.method if m.peak_mb is not None else None,
            build_seconds=build.get("build_seconds"), compile_seconds=build.get("compile_seconds"),
            open_seconds=build.get("open_seconds"), build_note=build.get("build_note"),
        )
        cut = self._cut(case.config if case.config is not None else NO_CACHE)
        if case.kind == "reference" and "cut_controlnet" in cut:
            cut = {**cut, "cut_controlnet": False}  # DeepCacheSDHelper runs the whole ControlNet on every step
        key = tuple(sorted(cut.items()))
        if key not in self.flops:
            self.flops[key] = graph_flops(self.family, self.model, cut, self._build_config("eager", cut),
                                          self.geometry)
        fl = self.flops[key]
        r.update(flops_full=fl["full"], flops_shallow=fl["shallow"], flops_method=fl["method"],
                 flops_shallow_fraction=fl["shallow"] / fl["full"])
        if m.num_evaluations:
            r["theoretical_speedup"] = theoretical_speedup(m.num_evaluations, n_full, n_shallow, fl["full"],
                                                           fl["shallow"])
        vs, ref = self._fidelity_ref(case, steps)
        if ref is not None:
            r["fidelity_vs"] = vs
            r.update(fidelity(m.output, ref))
        base = self.outputs.get(("baseline", steps))
        if base is not None and case.kind != "baseline":
            f = fidelity(m.output, base)
            r.update(latent_rel_l2_vs_baseline=f["latent_rel_l2"], psnr_db_vs_baseline=f["psnr_db"])
            r["latents_equal_baseline"] = bool(torch.equal(m.output.latents, base.latents))
        eager = self.measurements.get((Case("dcaccel", "eager", case.config), steps)) if case.kind == "reference" \
            else None
        if eager is not None and eager.output is not None:
            r["latents_equal_eager"] = bool(torch.equal(m.output.latents, eager.output.latents))
        return r

    def _base_record(self, case: Case, steps: int, status: str) -> dict:
        a, c = self.args, case.config
        cached = c is not None and case.kind != "baseline"
        cut = self._cut(c) if cached else {}
        return {
            "kind": case.kind, "peer": case.peer, "status": status, "label": case.label, "backend": case.backend,
            "cache": case.cache, "family": self.family.name,
            "interval": c.interval if cached else None,
            "branch": cut.get("branch"), "head_blocks": cut.get("head_blocks"), "tail_blocks": cut.get("tail_blocks"),
            "cut_controlnet": (False if case.kind == "reference" and "cut_controlnet" in cut
                               else cut.get("cut_controlnet")),
            "controlnets": a.controlnets,
            "schedule": c.schedule if cached else None,
            "model": self.model_name, "weights": self.weights, "height": self.height, "width": self.width,
            "batch": a.batch, "steps": steps, "guidance": self.guidance, "scheduler": self.scheduler_name,
            "prompt": a.prompt, "seed": a.seed, "dtype": self.dtype, "device": self.device.type,
            "threads": self.torch_threads, "ort_threads": a.threads, "repeats": a.repeats,
            "warmup": max(a.warmup, 1), "interleaved": True, "loras": self.loras,
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
            "settings": (f"{self.height}x{self.width}, batch {a.batch}, guidance {self.guidance}, scheduler "
                         f"{self.scheduler_name}, steps {', '.join(map(str, self.steps))}, {a.repeats} interleaved "
                         f"rounds after {max(a.warmup, 1)} untimed call(s) per configuration, torch threads "
                         f"{self.torch_threads}, ONNX Runtime threads {a.threads or 'default'}, seed {a.seed}, "
                         f"dtype {self.dtype}, device {self.device.type}, LoRA {lora_text}, torch_compile freezing "
                         f"{getattr(a, 'compile_freezing', None) or 'default'}"),
            "memory": self.memory.method,
            "family": self.family.name,
        }

    def run(self) -> list[dict]:
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.jsonl").write_text("")
        (self.out_dir / "partial.jsonl").write_text("")
        logger.info("writing to %s", self.out_dir)
        runnable = [c for c in self.cases if not c.not_run]
        with contextlib.ExitStack() as stack:
            if self.args.engine_dir:
                self.engine_root = Path(self.args.engine_dir)
            else:
                self.engine_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dcaccel-bench-")))
            total = len(runnable) * (1 + self.args.repeats)
            with tqdm(total=total, desc="dcaccel bench", unit="config", disable=self.args.no_progress) as progress:
                for case in runnable:
                    self._warm_up(case, progress)
                for _ in range(self.args.repeats):
                    for case in runnable:
                        self._round(case, progress)
            for runner, _ in self.kept.values():
                runner.close()
            self.kept.clear()
            gc.collect()
            for case in self.cases:
                for steps in self.steps:
                    self._emit(self._record(case, steps))
        derive_speedups(self.records)
        with open(self.out_dir / "results.jsonl", "w") as f:  # again, now with the derived fields
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in self.records)
        recs = recommend(self.records, self.args) if self.args.sweep else []
        write_markdown(self.records, self.out_dir / "results.md", self.header(), recs or None)
        if self.args.sweep:
            (self.out_dir / "recommendation.json").write_text(json.dumps(recs, indent=1, allow_nan=False) + "\n")
        self.plot_note = write_plot(self.records, self.out_dir / "results.png", self.header())
        return self.records + recs


def _stats_from_mask(stats, mask: list[int]):
    """Hook timings of a compiled transformer (whose inner modules fire no hooks) sorted into full and cached
    evaluations by cache-dit's static mask."""
    from ..runtime import StepStats

    timings = sorted(zip(stats.full_steps + stats.shallow_steps, stats.full_seconds + stats.shallow_seconds))
    out = StepStats()
    for step, seconds in timings:
        full = step >= len(mask) or mask[step] == 1
        (out.full_steps if full else out.shallow_steps).append(step)
        (out.full_seconds if full else out.shallow_seconds).append(seconds)
    return out
