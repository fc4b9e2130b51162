#!/usr/bin/env python3
"""LoRA swap in a built pipeline against a full rebuild, on one backend (onnxruntime by default).

    python benchmarks/lora_swap.py --arch sd15 --height 256 --width 256 --engine-dir engines/bench

Builds (or reuses) the engines without LoRA, enables DeepCache on them, then times: fusing LoRA A into the served
pipeline (dcaccel.lora.apply_loras: fuse + refit of both graphs), swapping A for B (swap_loras), and, with
--rebuild, a full build with B fused. The LoRAs are random (rank --rank on every attention projection), written
to a temporary directory: their values do not change the cost. Prints what it measured; writes nothing else.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcaccel  # noqa: E402
from dcaccel.engines import Manifest, build_engines  # noqa: E402
from dcaccel.config import BuildConfig, DeepCacheConfig  # noqa: E402
from dcaccel.lora import LoraSpec, apply_loras, lora_record, remove_loras, swap_loras  # noqa: E402
from dcaccel.models import build_pipeline, default_resolution  # noqa: E402

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def write_random_lora(unet, path: Path, rank: int, seed: int) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(PROJECTIONS):
            out_features, in_features = m.weight.shape
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) * 0.01
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * 0.01
    save_file(tensors, str(path))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch_compile"))
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--engine-dir", default=None, help="where engines are built/reused (default: a temporary dir)")
    p.add_argument("--rebuild", action="store_true", help="also time a full build with LoRA B fused")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = build_pipeline(args.arch)
    size = default_resolution(pipe)
    build = BuildConfig(height=args.height or size, width=args.width or size, branch=args.branch,
                        backend=args.backend)
    tmp = Path(tempfile.mkdtemp(prefix="dcaccel-lora-"))
    out = Path(args.engine_dir) if args.engine_dir else tmp / "engines"
    t0 = time.perf_counter()
    directory, built = build_engines(pipe, build, out_dir=out, model_name=args.arch)
    print(f"{args.arch} (random weights), {build.height}x{build.width}, {args.backend}, branch {args.branch}")
    print(f"engines without LoRA: {directory} ({'built' if built else 'reused'} in "
          f"{time.perf_counter() - t0:.1f} s; recorded build time "
          f"{Manifest.read(directory).data['build_seconds']} s)")
    a = LoraSpec(write_random_lora(pipe.unet, tmp / "a.safetensors", args.rank, 1), 0.8, name="A")
    b = LoraSpec(write_random_lora(pipe.unet, tmp / "b.safetensors", args.rank, 2), 1.0, name="B")

    t0 = time.perf_counter()
    dcaccel.enable(pipe, DeepCacheConfig(interval=3, branch=args.branch), backend=args.backend, engine_dir=directory)
    print(f"load engines: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    apply_loras(pipe, [a])
    print(f"fuse LoRA A into the served pipeline (fuse + refit both graphs): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    swap_loras(pipe, [b])
    swap = time.perf_counter() - t0
    print(f"swap A for B (restore, fuse B, refit both graphs): {swap:.1f} s")
    dcaccel.disable(pipe)
    if args.rebuild:
        t0 = time.perf_counter()
        build_engines(pipe, build, out_dir=tmp / "rebuild", model_name=args.arch, loras=lora_record([b]))
        rebuild = time.perf_counter() - t0
        print(f"full rebuild with B fused: {rebuild:.1f} s -> swap is {rebuild / swap:.1f}x faster")
    remove_loras(pipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
