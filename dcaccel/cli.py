"""`dcaccel generate | build | serve | bench`: the command line.

generate  one image with DeepCache (optionally against the plain pipeline: --baseline)
calibrate choose the full steps offline for a model, scheduler, step count and guidance: a calibration file
build     the full and shallow graphs of a model, offline, into engines/<model>/<key>/ (also build_scripts/build.py)
serve     an HTTP server on Ray Serve: batched requests into the built engines
bench     the benchmark matrix and sweep (see benchmarks/README.md)

A model is a local diffusers pipeline directory, the embedded trained `shapes` model (the default: a small
SD-shaped pipeline trained on CPU to draw coloured shapes, 32x32, see dcaccel/shapes) or `shapes-sd3` (the same
task on SD 3's architecture), or the name of an embedded architecture (tiny, tiny-xl, sd15, sd21, sdxl): those
are built from configs in dcaccel/configs with random weights, so they need no download and are untrained: their
images are noise-like, their timings are those of the real architecture.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "shapes"
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"  # for other models than shapes
CALIBRATION_PROMPTS = (  # `dcaccel calibrate` on a model other than the shapes ones, without --prompts
    "a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse on a cliff at dusk",
    "a close-up portrait of an old fisherman, studio lighting", "a bowl of ramen on a wooden table, top view",
    "a futuristic city skyline at night with neon lights", "a red fox in a snowy forest, wildlife photography",
    "an isometric illustration of a cozy library", "a vintage car parked on a cobblestone street in the rain",
)
DEFAULT_GUIDANCE = 7.5
SD3_GUIDANCE = 7.0
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lcm": "LCMScheduler",
}
DTYPES = ("float32", "float16", "bfloat16")
MAX_STEPS = 1000


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in logs
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:  # the libraries' own verbosity settings, read when they are first imported
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"dcaccel {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        if args.verbose:
            raise
        print(f"dcaccel {args.command}: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcaccel", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image with DeepCache", description=generate.__doc__)
    gen.add_argument("prompt", nargs="?", help="default: a caption the shapes model knows, else an SD prompt")
    add_model_arguments(gen)
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    gen.add_argument("--guidance", type=float,
                     help="classifier-free guidance scale (default 4 for shapes, 7 for SD 3.x, else 7.5)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--scheduler", choices=sorted(SCHEDULERS),
                     help="U-Nets: replace the model's scheduler (default: keep it; DDIM for the embedded ones)")
    add_cache_arguments(gen)
    gen.add_argument("--backend", default="eager", help="eager, torch_compile, onnxruntime or tensorrt")
    add_option_argument(gen)
    gen.add_argument("--engine-dir", help="built engines for --backend (from `dcaccel build`); without one an "
                                          "engine backend builds for this call's shapes first")
    gen.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="fuse this LoRA first (repeatable; also into the --baseline run); shapes-lcm names the "
                          "shipped LCM-LoRA of the shapes model (use with --scheduler lcm --steps 4 --guidance 1)")
    add_ip_adapter_argument(gen)
    gen.add_argument("--ip-adapter-image", action="append", default=[], metavar="IMAGE",
                     help="the image prompt of each --ip-adapter, in order (needs the adapter's image encoder: an "
                          "image_encoder/ directory beside the first --ip-adapter file)")
    gen.add_argument("--image", help="input image: img2img (or inpainting with --mask)")
    gen.add_argument("--mask", help="inpainting mask (white = repaint)")
    gen.add_argument("--strength", type=float, default=0.8, help="img2img/inpaint strength (default 0.8)")
    gen.add_argument("--threads", type=int, help="torch (and ONNX Runtime) threads")
    gen.add_argument("--output", "-o", default="dcaccel.png",
                     help="output image, PNG, JPEG or WebP by its extension (default dcaccel.png)")
    gen.add_argument("--baseline", action="store_true",
                     help="also run the plain pipeline (no DeepCache, eager) on the same seed: print the speedup "
                          "and the image difference; saves <output>-baseline (same format)")
    gen.set_defaults(func=generate)

    cal = sub.add_parser("calibrate", help="calibrate the full-step schedule of a model (a calibration file)",
                         description=calibrate.__doc__)
    add_model_arguments(cal)
    cal.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    cal.add_argument("--guidance", type=float,
                     help="classifier-free guidance scale (default 4 for shapes, 7 for SD 3.x, else 7.5)")
    cal.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="U-Nets: replace the model's scheduler first")
    add_cut_arguments(cal)
    cal.add_argument("--prompts", help="a text file, one prompt per line (default: the shapes models' calibration "
                                       "captions, else 8 built-in prompts)")
    cal.add_argument("--images-per-prompt", type=int, default=1,
                     help="calibrate on each prompt this many times, with other seeds (default 1)")
    cal.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    cal.add_argument("--batch", type=int, help="prompts per pipeline call (default: all)")
    cal.add_argument("--max-gap", type=int, help="longest run of cached steps (default: half the steps)")
    cal.add_argument("--refine", type=int, default=0,
                     help="rounds of local search per budget (default 0; each costs about 2 x budget real calls)")
    cal.add_argument("--no-sensitivity", action="store_true",
                     help="skip the per-step sensitivity calls (cheaper by one uncached call per step, worse "
                          "schedules: see README)")
    cal.add_argument("--objective", choices=("latent", "image"), default="latent",
                     help="what the search brings close to the uncached output: the final latents (default) or the "
                          "decoded image (one VAE decode per call; fitted the 11 shapes captions closer and did "
                          "worse on new ones: see README)")
    cal.add_argument("--threads", type=int, help="torch threads")
    cal.add_argument("--out", "-o", required=True, help="the calibration file to write (JSON)")
    cal.set_defaults(func=calibrate)

    bld = sub.add_parser("build", help="build engines offline", description=build.__doc__)
    add_build_arguments(bld)
    bld.set_defaults(func=build)

    srv = sub.add_parser("serve", help="serve a model over HTTP on Ray Serve", description=serve.__doc__)
    add_serve_arguments(srv)
    srv.set_defaults(func=serve)

    bench = sub.add_parser("bench", help="benchmark backends x DeepCache settings; sweep for a recommendation")
    try:
        from . import bench as bench_module
    except ImportError as e:  # an optional package the benchmark needs
        bench.set_defaults(func=lambda args: _missing(f"dcaccel bench is unavailable: {e}"))
    else:
        bench_module.add_arguments(bench)
        bench.set_defaults(func=lambda args: bench_module.run(args) and 0)
    return parser


def _missing(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local diffusers pipeline directory, an embedded trained model (shapes, shapes-sd3), or an "
                        f"embedded architecture with random weights (tiny, tiny-xl, sd15, sd21, sdxl; "
                        f"default {DEFAULT_MODEL})")
    p.add_argument("--height", type=int,
                   help="default: the model's native size (32 for shapes, 256 for the embedded sd15)")
    p.add_argument("--width", type=int)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu")


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=int, help="full denoiser every N evaluations (1 = off; default: the model "
                                                   "family's, 3 for U-Nets, see README for SD 3)")
    add_cut_arguments(p)
    p.add_argument("--schedule", choices=("uniform", "nonuniform", "explicit", "calibrated", "dynamic"),
                   help="default uniform; calibrated with --calibration (the default for shapes and shapes-sd3, "
                        "whose calibrations are shipped, when no --interval is given); dynamic (SD 3) with "
                        "--threshold")
    p.add_argument("--threshold", type=float, help="dynamic: the probe's relative change below which a step is "
                                                   "cached (e.g. 0.24)")
    p.add_argument("--center", type=int, help="nonuniform: the step full steps gather around")
    p.add_argument("--power", type=float, default=1.4, help="nonuniform: shape of the schedule (default 1.4)")
    p.add_argument("--full-steps", type=_int_list, help="explicit: comma-separated full evaluations, e.g. 0,4,9")
    p.add_argument("--calibration", help="calibrated schedule: a calibration file (or an engine directory holding "
                                         "one); implies --schedule calibrated")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--num-full-steps", type=int, help="calibrated: the budget of full evaluations "
                                                          "(default: the calibration's default budget)")
    budget.add_argument("--speedup", type=float, help="calibrated: the most full steps whose FLOP bound reaches "
                                                      "this speedup")
    p.add_argument("--calibration-fallback", action="store_true",
                   help="use a calibration made for another step count, guidance or model anyway (rescaled)")
    p.add_argument("--cache-start", type=int, default=0, help="cache only from this evaluation on")
    p.add_argument("--cache-end", type=int, help="cache only before this evaluation")


def add_cut_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--branch", type=int, help="U-Nets: the skip branch the graphs are cut at, 0 = shallowest and "
                                              "fastest (default 0)")
    p.add_argument("--head-blocks", type=int, help="SD 3.x transformers: the first blocks that run on a cached step "
                                                   "(default 0)")
    p.add_argument("--tail-blocks", type=int, help="SD 3.x transformers: the last blocks that run on a cached step "
                                                   "(default 1)")


def add_ip_adapter_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip-adapter", action="append", default=[], metavar="FILE[:SCALE]",
                   help="U-Nets: load this IP-Adapter file (diffusers' load_ip_adapter) with its scale (default 1; "
                        "repeatable: several adapters). Engines record it: build and generate with the same ones")


def add_option_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. exporter=dynamo or threads=2 (onnxruntime), freezing=false "
                        "(torch_compile), cuda_graph=true (tensorrt); an unknown key lists the allowed ones")


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--no-cfg", action="store_true", help="build for guidance_scale <= 1 (no batched guidance)")
    add_cut_arguments(p)
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime, torch_compile or tensorrt")
    p.add_argument("--out", default="engines", help="output directory (default engines/)")
    p.add_argument("--name", help="model name in the output path (default: architecture or directory name)")
    p.add_argument("--task", choices=("text2img", "img2img", "inpaint"), default="text2img",
                   help="pipeline the engines are for (inpaint U-Nets take 9 input channels)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="fuse this LoRA before building (repeatable)")
    add_ip_adapter_argument(p)
    p.add_argument("--ip-adapter-images", type=int, default=1,
                   help="IP-Adapter engines: image prompts per adapter in each call (default 1)")
    p.add_argument("--ip-adapter-masks", action="store_true",
                   help="IP-Adapter engines: graphs that take masks (cross_attention_kwargs['ip_adapter_masks'])")
    p.add_argument("--fp16", action="store_true", help="TensorRT: allow fp16 kernels (the option fp16=true)")
    p.add_argument("--refittable", action="store_true",
                   help="TensorRT: refittable engines for LoRA swaps (the option refittable=true)")
    add_option_argument(p)
    p.add_argument("--calibration", help="a calibration file for this model and cut: checked, and stored in the "
                                         "engine directory as calibration.json (generate and serve use it)")
    p.add_argument("--force", action="store_true", help="rebuild even if a build with the same key exists")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option takes KEY=VALUE, got {text!r}")
    lowered = value.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def model_label(model: str) -> str:
    from .models import ARCHITECTURES

    if model == "shapes":
        return "embedded shapes model (trained on CPU on drawn coloured shapes, 32x32; see dcaccel/shapes)"
    if model == "shapes-sd3":
        return ("embedded shapes-sd3 model (SD 3 architecture, 6 MMDiT blocks, trained on CPU on drawn coloured "
                "shapes, 32x32; see dcaccel/shapes)")
    if model in ARCHITECTURES:
        return f"embedded {model} architecture with RANDOM weights (untrained: the image is noise, timings are real)"
    return f"local pipeline {os.path.abspath(model)}"


def is_shapes_model(model: str) -> bool:
    """The embedded trained models draw the shapes captions: their prompts, guidance 4, and the scorer."""
    from .models import TRAINED

    return model in TRAINED


def check_model_arguments(args) -> None:
    """The arguments every command shares, checked before anything loads: one line naming what is wrong."""
    import torch

    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8 or value > 8192):
            raise ValueError(f"--{name} must be a multiple of 8 in 8..8192 (pixels), got {value}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r} is not a device torch knows ({e}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA device here (torch.cuda.is_available() is "
                         "False); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def check_generate_arguments(args) -> None:
    check_model_arguments(args)
    if not 1 <= args.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be an integer in 1..{MAX_STEPS}, got {args.steps}")
    if not 0 <= args.seed < 2 ** 64:
        raise ValueError(f"--seed must be an integer in 0..2**64-1 (a 64-bit generator seed), got {args.seed}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and 0 <= args.guidance <= 100):
        raise ValueError(f"--guidance must be a number in 0..100, got {args.guidance}")
    if args.mask and not args.image:
        raise ValueError("--mask needs --image (inpainting repaints the masked part of an image)")
    image_format(args.output, "--output")
    if len(args.ip_adapter_image) != len(args.ip_adapter):
        raise ValueError(f"give one --ip-adapter-image per --ip-adapter (got {len(args.ip_adapter_image)} image(s) for "
                         f"{len(args.ip_adapter)} adapter(s))")
    for path in args.ip_adapter_image:
        _open_image("--ip-adapter-image", path).close()
    if args.mask:
        from .models import check_task

        check_task(args.model, "inpaint")
    if args.image:
        if not math.isfinite(args.strength) or not 0 < args.strength <= 1:
            raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
        if int(args.steps * args.strength) < 1:
            raise ValueError(f"--strength {args.strength} with --steps {args.steps} runs no denoising step "
                             f"(steps x strength must be >= 1): raise --strength to at least {1 / args.steps:.3g} "
                             "or give more --steps")
        for flag, path in (("--image", args.image), ("--mask", args.mask)):
            if path:
                _open_image(flag, path).close()


def check_scheduler_steps(scheduler, steps: int, strength: float = 1.0) -> None:
    """Refuse a step count the scheduler cannot run: one it refuses itself (LCMScheduler: more than its
    original_inference_steps), or one whose timesteps run past its noise table (DDIM with "leading" spacing and
    steps_offset=1 puts its first timestep at 1000 when asked for 1000 steps: an IndexError mid-call).
    img2img/inpaint (strength < 1) only run the last steps x strength timesteps."""
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:  # flow-matching schedulers have no table to run past
        return
    name = type(scheduler).__name__

    def problem(n: int) -> str | None:
        probe = type(scheduler).from_config(scheduler.config)
        try:
            probe.set_timesteps(n)
        except ValueError as e:
            return f"{name} refuses it ({e})"
        used = probe.timesteps[n - min(int(n * strength), n):]
        if len(used) and int(used.max()) >= len(table):
            return f"{name} with this model's config would run past its {len(table)}-entry noise table"
        return None

    reason = problem(steps)
    if reason:
        allowed = next((n for n in range(steps - 1, 0, -1) if problem(n) is None), 0)
        raise ValueError(f"--steps {steps}: {reason}; use --steps 1..{allowed}")


def _open_image(flag: str, path: str):
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; give an image file (PNG, JPEG, ...)")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path} does not exist")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{flag} {path} is not an image PIL can read ({type(e).__name__}: {e})") from None
    return image


def load_model(args, task: str = "text2img"):
    from .models import load_pipeline

    if not args.verbose:  # diffusers' and transformers' loading progress bars, unless -v
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

    pipe = load_pipeline(args.model, task, dtype=_dtype(args.dtype))
    if args.device != "cpu":
        pipe.to(args.device)
    return pipe


def cache_config(args):
    """The DeepCacheConfig of generate's arguments. A calibration: --calibration, or the shipped one of the shapes
    models when no schedule and interval are given (their default); an engine directory's calibration.json with
    --schedule calibrated alone."""
    from .config import DeepCacheConfig
    from .models import shipped_calibration

    schedule, calibration = args.schedule, args.calibration
    if calibration is None and schedule == "calibrated" and getattr(args, "engine_dir", None):
        calibration = args.engine_dir
    if calibration is None and schedule is None and args.interval is None and args.full_steps is None \
            and args.num_full_steps is None and args.speedup is None and args.threshold is None:
        calibration = shipped_calibration(args.model)
        if calibration is not None and not _shipped_fits(args, calibration):
            calibration = None  # a call the shipped calibration was not made for: today's default schedule
    if calibration is not None:
        if schedule not in (None, "calibrated"):
            raise ValueError(f"--calibration is a calibrated schedule; --schedule {schedule} is another one")
        if args.interval is not None:
            raise ValueError("--interval does not apply to a calibrated schedule (--num-full-steps or --speedup "
                             "choose its budget)")
        schedule = "calibrated"
    elif schedule == "calibrated":
        raise ValueError("--schedule calibrated needs --calibration FILE (from `dcaccel calibrate`)")
    elif args.num_full_steps is not None or args.speedup is not None or args.calibration_fallback:
        raise ValueError("--num-full-steps, --speedup and --calibration-fallback need a calibrated schedule "
                         "(--calibration FILE)")
    return DeepCacheConfig(interval=args.interval, branch=args.branch, head_blocks=args.head_blocks,
                           tail_blocks=args.tail_blocks, schedule=schedule or "uniform", center=args.center,
                           power=args.power, full_steps=args.full_steps, cache_start=args.cache_start,
                           cache_end=args.cache_end, calibration=calibration, num_full_steps=args.num_full_steps,
                           speedup=args.speedup, calibration_fallback=args.calibration_fallback,
                           threshold=args.threshold)


def _shipped_fits(args, calibration) -> bool:
    """Whether a shipped calibration is made for this call: its cut (if cut flags are given), text-to-image, its
    steps and guidance. Otherwise the model's default is today's uniform schedule."""
    import math as _math

    from .calibration import Calibration

    cal = Calibration.load(calibration)
    valid = cal.valid_for
    given = {k: getattr(args, k) for k in ("branch", "head_blocks", "tail_blocks") if getattr(args, k) is not None}
    guidance = getattr(args, "guidance", None)
    return (all(valid["cut"].get(k) == v for k, v in given.items()) and not getattr(args, "image", None)
            and getattr(args, "steps", None) == cal.num_evaluations
            and (guidance is None or _math.isclose(guidance, valid["guidance_scale"])))


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path, flag: str = "--output") -> str:
    """The image format a file name asks for by its extension; refuses names of other formats."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{flag} {path}: the image format is taken from the file name's extension, which must be "
                         f"one of {sorted(IMAGE_FORMATS)} (got {suffix or 'none'!r})")
    return IMAGE_FORMATS[suffix]


def save_image(image, path: Path) -> None:
    """Write the image in the format its name's extension names (PNG, JPEG, WebP) under a temporary name and rename
    it into place: an interrupted run leaves no partial file."""
    fmt = image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        image.save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generate(args) -> int:
    """Generate one image with DeepCache and print the denoiser-loop and total times; with --baseline, also the
    plain pipeline's, the speedup and the difference between the two images."""
    import diffusers
    import torch

    from . import pipeline as dc
    from .families import family_of_pipeline
    from .models import default_resolution, load_ip_adapters, path_and_scale
    from .runtime import DenoiserTimer

    check_generate_arguments(args)
    _set_threads(args.threads)
    task = "inpaint" if args.mask else "img2img" if args.image else "text2img"
    if is_shapes_model(args.model):
        from . import shapes

        args.prompt = args.prompt or shapes.DEFAULT_PROMPT
        args.guidance = shapes.GUIDANCE_SCALE if args.guidance is None else args.guidance
    config = cache_config(args)
    args.prompt = args.prompt or DEFAULT_PROMPT
    print(f"model: {model_label(args.model)}")
    start = time.perf_counter()
    pipe = load_model(args, task)
    print(f"loaded in {time.perf_counter() - start:.1f} s ({task})")
    denoiser_name = family_of_pipeline(pipe).denoiser_attr
    if args.lora:
        from .lora import apply_loras, parse_lora_argument

        apply_loras(pipe, [parse_lora_argument(text) for text in args.lora], fuse=True)
    if args.ip_adapter:
        load_ip_adapters(pipe, args.ip_adapter)
        if getattr(pipe, "image_encoder", None) is None:
            raise ValueError("--ip-adapter-image needs the adapter's image encoder: an image_encoder/ directory (a "
                             f"CLIPVisionModelWithProjection) beside {path_and_scale(args.ip_adapter[0])[0]}")
    if args.scheduler:
        if denoiser_name != "unet":
            raise ValueError(f"--scheduler {args.scheduler} is for U-Net models; SD 3.x samples with its own "
                             f"{type(pipe.scheduler).__name__} (leave --scheduler out)")
        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    check_scheduler_steps(pipe.scheduler, args.steps, args.strength if args.image else 1.0)
    if args.guidance is None:
        args.guidance = SD3_GUIDANCE if denoiser_name == "transformer" else DEFAULT_GUIDANCE
    label = "U-Net" if denoiser_name == "unet" else "transformer"
    size = default_resolution(pipe)
    height, width = args.height or size, args.width or size
    call = {"prompt": args.prompt, "num_inference_steps": args.steps, "guidance_scale": args.guidance}
    if task == "text2img":
        call.update(height=height, width=width)
    else:
        call.update(image=_open_image("--image", args.image).convert("RGB").resize((width, height)),
                    strength=args.strength)
        if task == "inpaint":
            call.update(mask_image=_open_image("--mask", args.mask).convert("L").resize((width, height)),
                        height=height, width=width)
    if args.ip_adapter_image:
        call["ip_adapter_image"] = [_open_image("--ip-adapter-image", p).convert("RGB") for p in args.ip_adapter_image]

    def run():
        t0 = time.perf_counter()
        image = pipe(**call, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
        return image, time.perf_counter() - t0

    baseline = None
    if args.baseline:
        with DenoiserTimer(getattr(pipe, denoiser_name)) as timer:
            base_image, base_total = run()
        baseline = (base_image, base_total, timer.seconds, timer.calls)

    options = dict(_option(o) for o in args.option)
    if args.backend != "eager":
        if args.engine_dir:
            options["engine_dir"] = args.engine_dir
        else:
            options.update(height=height, width=width, batch_size=1, cfg=args.guidance > 1, dtype=args.dtype)
        if args.threads and args.backend == "onnxruntime":
            options.setdefault("threads", args.threads)
    elif args.engine_dir:
        raise ValueError("--engine-dir needs an engine backend (--backend onnxruntime, torch_compile or tensorrt)")
    t0 = time.perf_counter()
    dc.enable(pipe, config, backend=args.backend, **options)
    try:
        setup = time.perf_counter() - t0
        if args.backend != "eager":
            print(f"backend {args.backend}: ready in {setup:.1f} s (build/compile/load, not in the times below)")
        image, total = run()
        stats = dc.last_stats(pipe)
        state = dc.enabled_state(pipe)
    finally:
        dc.disable(pipe)

    out = Path(args.output)
    save_image(image, out)
    n_full, n_shallow = len(stats.full_steps), len(stats.shallow_steps)
    c = state.config
    if c.schedule == "calibrated":
        how = f"calibrated by {c.calibration.path}, {n_full} full steps {stats.full_steps}"
    elif c.schedule == "dynamic":
        how = f"dynamic, threshold {c.threshold:g}, full steps {stats.full_steps}"
    else:
        how = f"interval {c.interval}, {c.schedule}"
    print(f"DeepCache {args.backend} ({how}, {state.family.cut_text(state.cut)}): "
          f"{n_full} full + {n_shallow} shallow {label} evaluations")
    print(f"  {label} loop {stats.denoiser_seconds:.2f} s, total {total:.2f} s -> {out}")
    if baseline:
        base_image, base_total, base_denoiser, base_calls = baseline
        base_out = out.with_name(out.stem + "-baseline" + out.suffix)
        save_image(base_image, base_out)
        psnr, max_diff = image_difference(base_image, image)
        print(f"baseline (plain pipeline, eager): {base_calls} {label} evaluations")
        print(f"  {label} loop {base_denoiser:.2f} s, total {base_total:.2f} s -> {base_out}")
        print(f"speedup: {label} loop {base_denoiser / stats.denoiser_seconds:.2f}x, total {base_total / total:.2f}x")
        print(f"image difference to baseline: PSNR {psnr:.2f} dB, max |diff| {max_diff} of 255")
    if is_shapes_model(args.model):
        report_shapes_reading(args.prompt, {"DeepCache": image, **({"baseline": baseline[0]} if baseline else {})})
    return 0


def report_shapes_reading(prompt: str, images: dict) -> None:
    """What the shapes scorer reads off each image, against what the prompt asked for."""
    import numpy as np

    from . import shapes
    from .shapes.data import ATTRIBUTES, to_tensor
    from .shapes.score import predict

    scorer = shapes.load_scorer()
    wanted = shapes.parse_caption(prompt)
    for label, image in images.items():
        if image.size != (shapes.data.RESOLUTION, shapes.data.RESOLUTION):
            print(f"scorer not run on the {label} image: it reads {shapes.data.RESOLUTION}x{shapes.data.RESOLUTION} "
                  f"images, this one is {image.size[0]}x{image.size[1]}")
            continue
        pred = predict(scorer, to_tensor(np.asarray(image.convert("RGB"))[None]))
        read = {name: ATTRIBUTES[name][int(pred[name][0])] for name in ATTRIBUTES}
        verdict = "" if wanted is None else (
            " (matches the prompt)" if all(read[n] == getattr(wanted, n) for n in ATTRIBUTES)
            else " (does NOT match the prompt)")
        print(f"scorer reads the {label} image as: {read['size']} {read['colour']} {read['shape']}, "
              f"{read['position']}{verdict}")


def image_difference(a, b) -> tuple[float, int]:
    """PSNR (dB) and the largest per-pixel difference between two 8-bit images."""
    import numpy as np

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
    return psnr, int(np.abs(x - y).max())


def calibrate(args) -> int:
    """Calibrate which denoiser evaluations run the full graph, for one model, scheduler, step count, guidance and
    cut, against the uncached output on calibration prompts, and write the calibration file (every budget of full
    steps with its schedule, FLOP bound and error). Use it with `generate --calibration FILE`, `build
    --calibration FILE` or DeepCacheConfig(schedule="calibrated", calibration=FILE). The file is written under a
    temporary name and renamed when complete."""
    import diffusers

    from .calibration import calibrate as run_calibration
    from .config import DeepCacheConfig
    from .families import family_of_pipeline

    check_model_arguments(args)
    _set_threads(args.threads)
    if not 2 <= args.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be an integer in 2..{MAX_STEPS}, got {args.steps}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and 0 <= args.guidance <= 100):
        raise ValueError(f"--guidance must be a number in 0..100, got {args.guidance}")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the calibration file's path (e.g. {out}/calibration.json)")
    if args.prompts:
        try:
            prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts {args.prompts}: cannot read it as text ({e})") from None
        if not prompts:
            raise ValueError(f"--prompts {args.prompts} holds no prompt (one per line)")
    elif is_shapes_model(args.model):
        from .shapes.data import calibration_scenes

        prompts = [s.caption for s in calibration_scenes()]
    else:
        prompts = list(CALIBRATION_PROMPTS)
    if not 1 <= args.images_per_prompt <= 100:
        raise ValueError(f"--images-per-prompt must be an integer in 1..100, got {args.images_per_prompt}")
    prompts = prompts * args.images_per_prompt  # image i of the list uses seed + i
    if is_shapes_model(args.model) and args.guidance is None:
        from . import shapes

        args.guidance = shapes.GUIDANCE_SCALE
    config = DeepCacheConfig(branch=args.branch, head_blocks=args.head_blocks, tail_blocks=args.tail_blocks)
    print(f"model: {model_label(args.model)}")
    pipe = load_model(args)
    family = family_of_pipeline(pipe)
    if args.scheduler:
        if family.denoiser_attr != "unet":
            raise ValueError(f"--scheduler {args.scheduler} is for U-Net models; SD 3.x samples with its own "
                             f"{type(pipe.scheduler).__name__} (leave --scheduler out)")
        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    check_scheduler_steps(pipe.scheduler, args.steps)
    if args.guidance is None:
        args.guidance = SD3_GUIDANCE if family.denoiser_attr == "transformer" else DEFAULT_GUIDANCE
    call = {}
    if args.height or args.width:
        from .models import default_resolution

        size = default_resolution(pipe)
        call.update(height=args.height or size, width=args.width or size)
    expected = 1 + (0 if args.no_sensitivity else args.steps - 1) + 2 * (args.steps - 2)
    start = time.perf_counter()
    done = 0

    def progress(text: str) -> None:
        nonlocal done
        done += 1
        filled = min(30, round(30 * done / expected))
        print(f"[{'#' * filled}{'.' * (30 - filled)}] {done}/~{expected} calls, {time.perf_counter() - start:.0f} s: "
              f"{text}", flush=True)

    print(f"calibrating on {len(prompts)} prompts, {args.steps} steps, guidance {args.guidance}, "
          f"{type(pipe.scheduler).__name__}")
    cal = run_calibration(pipe, prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          config=config, seed=args.seed, batch_size=args.batch, max_gap=args.max_gap,
                          refine=args.refine, sensitivity=not args.no_sensitivity, objective=args.objective,
                          progress=progress, **call)
    cal.save(out)
    search = cal.data["search"]
    print(cal.table())
    print(f"wrote {out}: {family.cut_text(cal.valid_for['cut'])}, {search['real_calls']} pipeline calls = "
          f"{search['uncached_call_equivalents']} uncached passes over the prompts, {cal.data['run']['seconds']:.0f} s")
    return 0


def build_options(args) -> dict:
    options = dict(_option(o) for o in args.option)
    for flag in ("fp16", "refittable"):
        if getattr(args, flag):
            if args.backend != "tensorrt":
                raise ValueError(f"--{flag} is a tensorrt option; backend {args.backend!r} does not take it")
            options[flag] = True
    return options


def build(args) -> int:
    """Build the full and shallow graphs of a model for one resolution, batch, dtype and cut into
    <out>/<model>/<key>/ with a manifest. A build whose key matches is skipped (--force rebuilds); files are
    written to a temporary directory renamed into place when complete."""
    from .config import BuildConfig
    from .engines import Manifest, build_engines
    from .models import ARCHITECTURES, TRAINED, default_resolution, load_ip_adapters

    check_model_arguments(args)
    options = build_options(args)
    if not 1 <= args.batch <= 64:
        raise ValueError(f"--batch must be an integer in 1..64, got {args.batch}")
    print(f"model: {model_label(args.model)}")
    pipe = load_model(args, args.task)
    if args.lora:
        from .lora import apply_loras, parse_lora_argument

        apply_loras(pipe, [parse_lora_argument(text) for text in args.lora], fuse=True)
    if args.ip_adapter_masks or args.ip_adapter_images != 1:
        if not args.ip_adapter:
            raise ValueError("--ip-adapter-images / --ip-adapter-masks are for IP-Adapter engines: give --ip-adapter")
    load_ip_adapters(pipe, args.ip_adapter)
    size = default_resolution(pipe)
    config = BuildConfig(height=args.height or size, width=args.width or size, batch_size=args.batch,
                         cfg=not args.no_cfg, dtype=args.dtype, branch=args.branch, head_blocks=args.head_blocks,
                         tail_blocks=args.tail_blocks, backend=args.backend, ip_adapter_images=args.ip_adapter_images,
                         ip_adapter_masks=args.ip_adapter_masks, device=args.device, options=options)
    name = args.name or (args.model if args.model in ARCHITECTURES + TRAINED else Path(args.model).resolve().name)
    calibration = None
    if args.calibration:  # checked against this pipeline and cut before anything is built
        from .calibration import Calibration
        from .families import family_of_pipeline

        calibration = Calibration.load(args.calibration)
        family = family_of_pipeline(pipe)
        model = family.denoiser(pipe)
        calibration.check_pipeline(pipe, family, model, family.resolve_cut(model, config))
    start = time.perf_counter()
    directory, built = build_engines(pipe, config, out_dir=args.out, model_name=name, force=args.force)
    if calibration is not None:
        calibration.save(directory / "calibration.json")
        print(f"calibration stored: {directory / 'calibration.json'} (budgets {calibration.budgets()[0]}.."
              f"{calibration.budgets()[-1]}, default {calibration.default_budget} full steps)")
    if not built:
        print(f"up to date: {directory} (same key; --force rebuilds)")
        return 0
    manifest = Manifest.read(directory)
    print(f"built {config.backend} engines in {time.perf_counter() - start:.1f} s: {directory}")
    for graph, info in manifest.data["graphs"].items():
        reached = {k: f"max |diff| {v['max_abs']:.2e}" for k, v in info["tolerance"]["reached"].items()}
        print(f"  {graph}: {', '.join(info['files'].values()) or '(in-process cache)'}; against eager: {reached}")
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"shapes, shapes-sd3, a local pipeline directory or an "
                                                          f"embedded architecture (default {DEFAULT_MODEL})")
    p.add_argument("--backend", default="eager", help="eager, torch_compile, onnxruntime or tensorrt")
    p.add_argument("--engine-dir", action="append", default=[],
                   help="built engines (one per resolution, repeatable; built for --batch = --max-batch); without "
                        "one a static backend builds for the model's default size at start-up")
    p.add_argument("--interval", type=int, help="DeepCache interval (default: the model family's)")
    add_cut_arguments(p)
    p.add_argument("--calibration", help="a calibration file (default: an --engine-dir's calibration.json, or the "
                                         "shipped one of shapes/shapes-sd3 when no --interval or cut is given); "
                                         "requests with other steps or guidance run its steps rescaled")
    p.add_argument("--num-full-steps", type=int, help="calibrated: the budget of full steps")
    p.add_argument("--speedup", type=float, help="calibrated: the most full steps whose FLOP bound reaches this")
    p.add_argument("--no-cache", action="store_true", help="serve without DeepCache")
    p.add_argument("--replicas", type=int, default=1, help="generator replicas (default 1)")
    p.add_argument("--max-batch", type=int, default=4, help="requests grouped into one pipeline call (default 4)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long a batch waits to fill (default 20 ms; 0 with --max-batch 1 means no batching)")
    p.add_argument("--max-queued", type=int, default=32,
                   help="requests queued per replica beyond those running; more get 503 (default 32)")
    p.add_argument("--deadline-s", type=float, default=120.0,
                   help="a request still running after this is cancelled and answered 504 (default 120)")
    p.add_argument("--threads", type=int, help="torch threads per replica (default: its CPUs)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--resources-per-replica", metavar="JSON", type=_resources,
                   help='Ray custom resources each replica reserves, e.g. \'{"dcaccel_slot": 1}\' to place one '
                        "replica per node started with that resource")
    p.add_argument("--ingress-resources", metavar="JSON", type=_resources,
                   help='Ray custom resources the HTTP ingress reserves, e.g. \'{"dcaccel_ingress": 1}\' to keep it '
                        "on the node started with that resource")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port of the local Ray (default: random)")
    p.add_argument("--emit-config", metavar="PATH",
                   help="write a Serve config file for `serve deploy` with these settings and exit")
    p.add_argument("--min-replicas", type=int, help="--emit-config: autoscale from this many replicas")
    p.add_argument("--max-replicas", type=int, help="--emit-config: autoscale up to this many replicas")
    p.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"], default="EveryNode",
                   help="--emit-config: an HTTP proxy on every node (default) or on the head node only")


def _resources(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); give an object such as '{{\"dcaccel_slot\": 1}}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"give a JSON object such as '{{\"dcaccel_slot\": 1}}', not {text}")
    return value


def check_served_model(args) -> None:
    """What can be checked before Ray starts and a replica fails: the model exists, and the cut is its family's
    (a replica's own error would reach the user only as Ray's "Failed to update the deployments")."""
    from .models import denoiser_config

    family, _ = denoiser_config(args.model)
    if family == "sd3" and args.branch is not None:
        raise ValueError(f"--branch cuts a U-Net; {args.model} is an SD 3 transformer: give --head-blocks and "
                         "--tail-blocks instead")
    if family != "sd3" and (args.head_blocks is not None or args.tail_blocks is not None):
        raise ValueError(f"--head-blocks/--tail-blocks cut an SD 3 transformer; {args.model} is a U-Net: give "
                         "--branch instead")


def serve(args) -> int:
    """Serve a dcaccel pipeline over HTTP on Ray Serve: POST /v1/generate (JSON in, PNG out), GET /v1/models,
    GET /healthz. Starts a local Ray (or joins --address), loads the model on every replica, serves until
    Ctrl-C, then drains and exits 0."""
    from .serve.model import ServeSettings

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    # absolute paths: replicas (and `serve deploy` of an --emit-config file) run in other working directories
    model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    settings = ServeSettings(model=model, backend=args.backend,
                             engine_dirs=[os.path.abspath(d) for d in args.engine_dir],
                             interval=args.interval, branch=args.branch, head_blocks=args.head_blocks,
                             tail_blocks=args.tail_blocks, no_cache=args.no_cache,
                             calibration=args.calibration and os.path.abspath(args.calibration),
                             num_full_steps=args.num_full_steps, speedup=args.speedup, replicas=args.replicas,
                             max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queued=args.max_queued,
                             deadline_s=args.deadline_s, threads=args.threads,
                             cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                             resources_per_replica=args.resources_per_replica or {},
                             ingress_resources=args.ingress_resources or {},
                             device=args.device, dtype=args.dtype)
    from .config import DeepCacheConfig

    DeepCacheConfig(interval=args.interval, branch=args.branch, head_blocks=args.head_blocks,
                    tail_blocks=args.tail_blocks)  # the settings' errors before Ray starts
    check_served_model(args)
    if args.calibration:
        DeepCacheConfig(schedule="calibrated", calibration=args.calibration, num_full_steps=args.num_full_steps,
                        speedup=args.speedup)
    elif args.num_full_steps is not None or args.speedup is not None:
        if not any(os.path.isfile(os.path.join(d, "calibration.json")) for d in args.engine_dir) and not (
                is_shapes_model(args.model) and args.interval is None):
            raise ValueError("--num-full-steps and --speedup need a calibration (--calibration FILE, or an "
                             "--engine-dir built with --calibration)")
    try:
        from .serve import server
    except ImportError as e:
        raise ImportError(f"dcaccel serve needs Ray Serve ({e}): pip install 'dcaccel[serve]'") from e
    if args.emit_config:
        path = server.write_config(args.emit_config, server.serve_config(settings, args.host, args.port,
                                                                       args.min_replicas, args.max_replicas,
                                                                       args.proxy_location))
        print(f"wrote {path}: deploy it with `serve deploy {path}` on a Ray cluster started from this environment")
        return 0
    return server.serve_forever(settings, args.host, args.port, args.address, args.metrics_port)


def run(argv: list[str] | None = None) -> None:
    """The `dcaccel` command: main(), then exit with its code. After Ctrl-C (130) the process ends at once with
    os._exit, its output flushed: CPython 3.11 can otherwise turn a KeyboardInterrupt that main() caught into a
    death by SIGINT at interpreter shutdown (exit status -2 instead of 130, seen in about 1 of 7 interrupted
    `generate` runs; the partial files are already gone by then)."""
    code = main(argv)
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
