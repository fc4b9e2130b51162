"""Peak host memory of an ONNX Runtime build, beyond the pipeline (issue 24).

In this (fresh) process: load an embedded architecture, trim the heap, reset the kernel's peak RSS (VmHWM, via
/proc/self/clear_refs) and build its engine with `build_engines` (export, weight map, the constants check, both
sessions opened and checked against eager). Prints the pipeline's RSS, the peak (VmHWM) and what the build added,
in GiB and in units of the denoiser's weights. With --export-only: only the export and weight map of the full
graph (no sessions), the part of a build a TensorRT build shares. Linux only (VmHWM).

    python benchmarks/build_memory.py --model sd15 --size 256
    python benchmarks/build_memory.py --model sd35m --size 128 --export-only

A sampler thread could not measure this: the TorchScript exporter holds the GIL for minutes.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1 << 30


def status_gib(key: str) -> float:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields[key].split()[0]) * 1024 / GIB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", help="an embedded architecture (sd15, sd35m, ...)")
    p.add_argument("--size", type=int, default=256, help="height and width of the build")
    p.add_argument("--export-only", action="store_true", help="only export the full graph and map its weights")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines
    from dcaccel.families import family_of_pipeline
    from dcaccel.graphs.onnx import export_onnx
    from dcaccel.graphs.weights import weight_map
    from dcaccel.models import build_pipeline

    pipe = build_pipeline(args.model)
    family = family_of_pipeline(pipe)
    denoiser = getattr(pipe, family.denoiser_attr)
    weights = sum(t.numel() * t.element_size() for t in denoiser.parameters()) / GIB
    cut = {"head_blocks": 0, "tail_blocks": 1} if family.name == "mmdit" else {}
    build = BuildConfig(backend="onnxruntime", height=args.size, width=args.size, **cut)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status_gib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dcaccel-build-memory-") as tmp:
        if args.export_only:
            from dcaccel.engines import _Request

            req = _Request(pipe, build, "onnxruntime")
            full = req.graphs()["full"]
            spec = req.specs(build)["full"]
            path = Path(tmp) / "full.onnx"
            export_onnx(full, spec, path)
            weight_map(path, full, spec)
            what = "export + weight map of the full graph"
        else:
            build_engines(pipe, build, out_dir=tmp, model_name=args.model, force=True)
            what = "whole onnxruntime build"
        seconds = time.perf_counter() - start
        peak = status_gib("VmHWM")
    print(f"{args.model} at {args.size} px, {what}: denoiser weights {weights:.2f} GiB, pipeline RSS {base:.2f} GiB, "
          f"peak RSS {peak:.2f} GiB, beyond the pipeline {peak - base:.2f} GiB = {(peak - base) / weights:.2f}x "
          f"the weights, {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
