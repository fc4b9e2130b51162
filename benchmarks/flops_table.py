"""FLOP bound of DeepCache settings for an embedded architecture, counted on a meta-device copy (no weights, no
arithmetic: fits any model on any machine). For each cut: FLOPs of one full and one cached (shallow) step, the
fraction f, and the bound (F + C) / (F + C f) of a uniform schedule over --steps evaluations.

    python benchmarks/flops_table.py --arch sd35l --height 1024 --width 1024 --steps 20 28 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dcaccel.bench.flops import graph_flops  # noqa: E402
from dcaccel.config import BuildConfig, DeepCacheConfig  # noqa: E402
from dcaccel.families import get_family  # noqa: E402
from dcaccel.models import architecture_config  # noqa: E402
from dcaccel.schedule import full_step_mask, theoretical_speedup  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, nargs="+", default=[20, 28, 50])
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--cuts", nargs="+", default=None,
                   help="head:tail pairs for SD 3.x (default 1:0 1:1 2:2 4:4), branches for U-Nets (default 0 1 2)")
    args = p.parse_args(argv)
    import diffusers

    cfg = architecture_config(args.arch)
    sd3 = cfg["family"] == "sd3"
    family = get_family("mmdit" if sd3 else "unet")
    with torch.device("meta"):
        model = (diffusers.SD3Transformer2DModel(**cfg["transformer"]) if sd3
                 else diffusers.UNet2DConditionModel(**cfg["unet"]))
    vae_scale = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    geometry = {"vae_scale_factor": vae_scale, "text_len": 77 + 256 if sd3 else 77}
    cuts = args.cuts or (["1:0", "1:1", "2:2", "4:4"] if sd3 else ["0", "1", "2"])
    params = sum(p.numel() for p in model.parameters())
    print(f"# FLOP bound: {args.arch} ({params / 1e9:.2f} B parameters in the denoiser), {args.height}x"
          f"{args.width}, batch 2 (guidance), counted on a meta-device copy\n")
    head = ["cut", "full step GFLOP", "cached step GFLOP", "f"] + [f"N={n}, {s} steps" for s in args.steps
                                                                    for n in args.intervals]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for text in cuts:
        cut = ({"head_blocks": int(text.split(":")[0]), "tail_blocks": int(text.split(":")[1])} if sd3
               else {"branch": int(text)})
        build = BuildConfig(height=args.height, width=args.width, **cut)
        f = graph_flops(family, model, cut, build, geometry)
        frac = f["shallow"] / f["full"]
        bounds = [theoretical_speedup(full_step_mask(DeepCacheConfig(interval=n), s), frac)
                  for s in args.steps for n in args.intervals]
        label = f"head {cut['head_blocks']}, tail {cut['tail_blocks']}" if sd3 else f"branch {cut['branch']}"
        print(f"| {label} | {f['full'] / 1e9:,.0f} | {f['shallow'] / 1e9:,.1f} | {frac:.3f} | "
              + " | ".join(f"{b:.2f}x" for b in bounds) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
