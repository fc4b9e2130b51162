#!/usr/bin/env python
"""What `dcaccel calibrate` costs on a real architecture, from FLOPs counted on a meta-device copy (no weights, no
arithmetic: runs anywhere). The count follows calibrate()'s passes over the calibration prompts: the record pass
(an uncached pass plus the shallow graph on each of the last max_gap features at every step), one pass per step
for the sensitivity (every step full but that one), and one confirmation pass per candidate (the step-graph
schedule of every budget and the uniform schedules; real runs deduplicate, so this is an upper bound).

    python benchmarks/calibration_cost.py --arch sd15 --size 512 --prompts 8 --tflops 300
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcaccel.bench.flops import graph_flops  # noqa: E402
from dcaccel.calibration import uniform_schedules  # noqa: E402
from dcaccel.config import BuildConfig, DeepCacheConfig  # noqa: E402
from dcaccel.families import get_family  # noqa: E402
from dcaccel.models import architecture_config  # noqa: E402


def passes(n: int, f: float, gap: int, refine: int = 0) -> dict:
    """Uncached-pass equivalents of each phase for n evaluations and shallow fraction f."""
    record = 1 + sum(min(j, gap) for j in range(n)) * f / n
    sensitivity = (n - 1) * (n - 1 + f) / n
    confirm = sum((k + (n - k) * f) / n for k in range(2, n))
    confirm += sum((k + (n - k) * f) / n for k in uniform_schedules(n))
    refine_cost = refine * sum(2 * (k - 1) * (k + (n - k) * f) / n for k in range(2, n))
    return {"record": record, "sensitivity": sensitivity, "confirm": confirm, "refine": refine_cost,
            "total": record + sensitivity + confirm + refine_cost}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tflops", type=float, default=300.0, help="sustained TFLOP/s assumed for the estimate")
    p.add_argument("--head-blocks", type=int)
    p.add_argument("--tail-blocks", type=int)
    p.add_argument("--branch", type=int)
    args = p.parse_args(argv)
    import diffusers

    from dcaccel.models import build_tokenizer

    cfg = architecture_config(args.arch)
    family = get_family("mmdit" if cfg["family"] == "sd3" else "unet")
    import torch

    with torch.device("meta"):
        model = (diffusers.SD3Transformer2DModel(**cfg["transformer"]) if cfg["family"] == "sd3"
                 else diffusers.UNet2DConditionModel(**cfg["unet"]))
    cut = family.resolve_cut(model, DeepCacheConfig(branch=args.branch, head_blocks=args.head_blocks,
                                                    tail_blocks=args.tail_blocks))
    vae = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    # SD 3.5 reads CLIP's 77 tokens and T5's 256
    geometry = {"vae_scale_factor": vae, "text_len": 333 if cfg["family"] == "sd3" else build_tokenizer().model_max_length}
    build = BuildConfig(height=args.size, width=args.size, batch_size=1, cfg=True, backend="onnxruntime", **cut)
    counts = graph_flops(family, model, cut, build, geometry)
    f = counts["shallow"] / counts["full"]
    n = args.steps
    ph = passes(n, f, math.ceil(n / 2))
    pass_flops = n * counts["full"] * args.prompts
    total = ph["total"] * pass_flops
    print(f"{args.arch} {args.size}px, {n} steps, {args.prompts} prompts, {family.cut_text(cut)}: full step "
          f"{counts['full'] / 1e9:,.0f} GFLOP (batch 2), f = {f:.3f}")
    print("uncached passes: " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()))
    print(f"total {total / 1e15:,.1f} PFLOP = {total / (args.tflops * 1e12) / 60:.1f} min at {args.tflops:g} "
          f"TFLOP/s sustained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
