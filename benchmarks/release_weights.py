"""Host memory with an ONNX Runtime engine, keeping the pipeline's own denoiser weights or releasing them (issue 24).

Builds (or reuses) an onnxruntime engine of an embedded architecture, then in fresh processes, alternating the two
settings, loads the pipeline, enables DeepCache from the engine with release_weights False / True, and runs one
call. Each process reports its RSS after loading the pipeline, after enable, after the call, and its peak RSS
(VmHWM), and the hash of the latents, which must be equal for both settings.

    python benchmarks/release_weights.py --model sd15 --height 256 --width 256 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import hashlib, json, sys, time
import torch
torch.set_num_threads({threads})
import dcaccel
from dcaccel import DeepCacheConfig
from dcaccel.models import build_pipeline

def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

out = {{}}
pipe = build_pipeline("{model}")
params = sum(p.numel() * p.element_size() for p in getattr(pipe, "{attr}").parameters())
out["denoiser_weights_mib"] = params / 2**20
out["rss_pipeline_mib"] = rss()[0]
t0 = time.perf_counter()
dcaccel.enable(pipe, DeepCacheConfig(interval=3), backend="onnxruntime", engine_dir="{engine}",
               release_weights={release})
out["enable_s"] = time.perf_counter() - t0
out["rss_enabled_mib"] = rss()[0]
t0 = time.perf_counter()
latents = pipe("a red circle", num_inference_steps={steps}, height={height}, width={width}, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
out["call_s"] = time.perf_counter() - t0
out["rss_after_call_mib"], out["peak_rss_mib"] = rss()
out["latents_sha256"] = hashlib.sha256(latents.numpy().tobytes()).hexdigest()[:16]
print("RESULT " + json.dumps(out))
"""


def main(argv=None) -> int:
    from dcaccel.bench.run import machine_info
    from dcaccel.config import BuildConfig
    from dcaccel.engines import build_engines
    from dcaccel.families import family_of_pipeline
    from dcaccel.models import build_pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="engines")
    p.add_argument("--out", help="results directory (default benchmarks/results/<date>-release-weights)")
    args = p.parse_args(argv)

    pipe = build_pipeline(args.model)
    attr = family_of_pipeline(pipe).denoiser_attr
    start = time.perf_counter()
    engine, built = build_engines(pipe, BuildConfig(height=args.height, width=args.width, backend="onnxruntime"),
                                  out_dir=args.engines, model_name=args.model)
    build_s = time.perf_counter() - start
    del pipe
    print(f"engine {engine} ({'built' if built else 'reused'} in {build_s:.0f} s)", flush=True)

    rows = []
    for r in range(args.rounds):
        for release in (False, True) if r % 2 == 0 else (True, False):
            code = CHILD.format(model=args.model, attr=attr, engine=engine, release=release, steps=args.steps,
                                height=args.height, width=args.width, threads=args.threads)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"round {r}, release_weights={release}: the child failed ({proc.returncode})")
            row = {"round": r, "release_weights": release, **json.loads(line[7:])}
            rows.append(row)
            print(json.dumps(row), flush=True)

    hashes = {row["latents_sha256"] for row in rows}
    summary = {}
    for release in (False, True):
        mine = [row for row in rows if row["release_weights"] == release]
        summary[str(release)] = {k: round(statistics.median(row[k] for row in mine), 1)
                                 for k in ("rss_pipeline_mib", "rss_enabled_mib", "rss_after_call_mib",
                                           "peak_rss_mib", "enable_s", "call_s")}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "model": args.model,
              "size": [args.height, args.width], "steps": args.steps, "rounds": args.rounds,
              "engine": str(engine), "denoiser_weights_mib": round(rows[0]["denoiser_weights_mib"], 1),
              "equal_latents": len(hashes) == 1, "rows": rows, "medians": summary}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{result['date']}-release-weights")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    keep, rel = summary["False"], summary["True"]
    lines = [f"# release_weights on {args.model} ({args.height}x{args.width}, onnxruntime engine, {args.steps} "
             f"steps, interval 3), {result['date']}",
             "", f"Machine: {result['machine']}", "",
             f"Denoiser weights: {result['denoiser_weights_mib']:.0f} MiB. Medians of {args.rounds} fresh processes "
             f"per setting, alternating. Latents equal in every process: {result['equal_latents']}.", "",
             "| release_weights | RSS after load (MiB) | after enable | after the call | peak RSS | enable (s) | "
             "call (s) |", "|---|---|---|---|---|---|---|"]
    for name, m in (("False (default)", keep), ("True", rel)):
        lines.append(f"| {name} | {m['rss_pipeline_mib']:.0f} | {m['rss_enabled_mib']:.0f} | "
                     f"{m['rss_after_call_mib']:.0f} | {m['peak_rss_mib']:.0f} | {m['enable_s']:.1f} | "
                     f"{m['call_s']:.1f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["equal_latents"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
