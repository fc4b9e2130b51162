#!/usr/bin/env python
"""LoRA after DeepCache, answered with quality: the shipped shapes LCM-LoRA at 2, 4 and 8 steps with DeepCache off,
N=2 and N=3 at branches 0 and 1, against DDIM 20 steps with and without DeepCache, on eager and ONNX Runtime.
Controls: DDIM at 4 steps, and the model without the LoRA under the LCM scheduler. Every row sees the same
prompts and seeds; prompt accuracy, held-out accuracy and FID come from the shapes scorer; U-Net-loop and total
time per image are medians of interleaved rounds (every row once per round, after an untimed warm-up call).
Writes results.jsonl, results.md and results.png to benchmarks/results/<date>-shapes-lcm-lora/.

    python benchmarks/lcm_quality.py                      # the default run (about 15 min on 2 cores)
    python benchmarks/lcm_quality.py --backends eager --seeds 1 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BACKENDS = ("eager", "onnxruntime")


@dataclass(frozen=True)
class Row:
    sampler: str            # "ddim" (the model's scheduler) or "lcm" (diffusers' LCMScheduler)
    lora: bool              # the shipped LCM-LoRA fused
    steps: int
    guidance: float
    interval: int | None    # DeepCache interval; None: off
    branch: int = 0

    @property
    def name(self) -> str:
        what = ("LCM-LoRA" if self.lora else "LCM scheduler, no LoRA") if self.sampler == "lcm" else "DDIM"
        cache = "no DeepCache" if self.interval is None else f"DeepCache N={self.interval} B={self.branch}"
        return f"{what} {self.steps} steps, {cache}"

    @property
    def cfg(self) -> bool:
        return self.guidance > 1


def plan(lcm_steps=(2, 4, 8), cuts=((2, 0), (2, 1), (3, 0), (3, 1)), ddim_steps: int = 20) -> list[Row]:
    rows = [Row("ddim", False, ddim_steps, 4.0, None), Row("ddim", False, ddim_steps, 4.0, 2),
            Row("ddim", False, ddim_steps, 4.0, 3), Row("ddim", False, 4, 4.0, None),
            Row("lcm", False, 4, 1.0, None)]
    for steps in lcm_steps:
        rows.append(Row("lcm", True, steps, 1.0, None))
        rows += [Row("lcm", True, steps, 1.0, n, b) for n, b in cuts]
    return list(dict.fromkeys(rows))  # in order, once (with --ddim-steps 4 the reference is also the control)


class Runner:
    """The two pipelines (without and with the LoRA), their schedulers, and ONNX Runtime engines built once per
    (pipeline, branch, guidance) into a scratch directory."""

    def __init__(self, model: str, lora_path: str, batch: int, threads: int):
        import diffusers

        from dcaccel import lora
        from dcaccel.models import load_pipeline

        self.batch, self.threads = batch, threads
        self.pipes = {False: load_pipeline(model), True: load_pipeline(model)}
        base = self.pipes[False].scheduler
        self.schedulers = {"ddim": base, "lcm": diffusers.LCMScheduler.from_config(base.config)}
        lora.use_lcm_lora(self.pipes[True], lora_path)
        self.scratch = tempfile.TemporaryDirectory(prefix="dcaccel-lcm-bench-")
        self.engines, self.build_seconds = {}, {}

    def engine_dir(self, row: Row) -> str:
        import time

        from dcaccel.config import BuildConfig
        from dcaccel.engines import build_engines

        key = (row.lora, row.branch, row.cfg)
        if key not in self.engines:
            start = time.perf_counter()
            build = BuildConfig(height=32, width=32, batch_size=self.batch, cfg=row.cfg, branch=row.branch,
                                backend="onnxruntime")
            self.engines[key], _ = build_engines(self.pipes[row.lora], build, self.scratch.name,
                                                 model_name=f"shapes-lora{int(row.lora)}")
            self.build_seconds[key] = time.perf_counter() - start
        return str(self.engines[key])

    def run(self, row: Row, backend: str, scenes, seed: int):
        from dcaccel.config import DeepCacheConfig
        from dcaccel.shapes.evaluate import generate

        pipe = self.pipes[row.lora]
        if not row.lora:
            pipe.scheduler = self.schedulers[row.sampler]
        config = None if row.interval is None else DeepCacheConfig(interval=row.interval, branch=row.branch)
        options = {}
        if backend == "onnxruntime":  # its own no-cache: the full graph on every step
            config = config or DeepCacheConfig(interval=1, branch=row.branch)
            options = {"engine_dir": self.engine_dir(row), "threads": self.threads}
        return generate(pipe, config, scenes, seed, row.steps, row.guidance, backend, batch=self.batch, warmup=True,
                        **options)


def measure(runner: Runner, rows: list[Row], backends, scorer, seeds: int, repeats: int, progress=print):
    from dcaccel.shapes import all_scenes
    from dcaccel.shapes.evaluate import Reference

    scenes = [s for _ in range(seeds) for s in all_scenes()]
    if len(scenes) % runner.batch:
        raise ValueError(f"{len(scenes)} images do not split into batches of {runner.batch} (static engine shapes)")
    ref = Reference(scorer, scenes)
    times = {(b, r): [] for b in backends for r in rows}
    images = {}
    for round_ in range(repeats):
        for backend in backends:
            for row in rows:
                imgs, unet_s, total_s = runner.run(row, backend, scenes, seed=10_000)
                times[backend, row].append((unet_s, total_s))
                images.setdefault((backend, row), imgs)
                progress(f"round {round_ + 1}/{repeats} {backend:11s} {row.name}: U-Net loop {unet_s:.1f} s, "
                         f"total {total_s:.1f} s")
    reference = (backends[0], rows[0])  # DDIM (20 steps by default) without DeepCache, on eager unless left out
    records = []
    for backend in backends:
        for row in rows:
            plain = next(r for r in rows if (r.sampler, r.lora, r.steps, r.interval) ==
                         (row.sampler, row.lora, row.steps, None))
            ratio = lambda ref_key, i: statistics.median(  # noqa: E731
                a[i] / b[i] for a, b in zip(times[ref_key], times[backend, row]))
            records.append({
                "backend": backend, "row": row.name, "sampler": row.sampler, "lora": row.lora, "steps": row.steps,
                "guidance": row.guidance, "interval": row.interval, "branch": row.branch,
                "images": len(scenes),
                **ref.metrics(images[backend, row], images[backend, plain] if row.interval else None),
                "unet_ms_per_image": 1e3 * statistics.median(t[0] for t in times[backend, row]) / len(scenes),
                "total_ms_per_image": 1e3 * statistics.median(t[1] for t in times[backend, row]) / len(scenes),
                "reference": f"{reference[0]}: {reference[1].name}",
                "unet_speedup_vs_reference": ratio(reference, 0),
                "total_speedup_vs_reference": ratio(reference, 1),
                "unet_speedup_vs_same_without_deepcache": ratio((backend, plain), 0),
                "total_speedup_vs_same_without_deepcache": ratio((backend, plain), 1),
            })
    return records, {"fid_real_floor": ref.fid_floor, "real_images": ref.real_images, "repeats": repeats,
                     "seeds": seeds, "build_seconds": {str(k): round(v, 1) for k, v in runner.build_seconds.items()}}


def markdown(records: list[dict], meta: dict, header: str) -> str:
    ref = records[0]["steps"]  # the reference row: DDIM without DeepCache, on the first backend
    lines = [header, "",
             f"Prompt accuracy: the scorer reads all four attributes as the prompt asked (chance 0.8%). Held out: "
             f"the 12 attribute combinations never seen in training. FID (scorer): Fréchet distance to "
             f"{meta['real_images']} real images; two real sets of this size are {meta['fid_real_floor']:.2f} "
             f"apart. PSNR: to the same sampler and steps without DeepCache (same seeds). Times are per image, "
             f"medians of {meta['repeats']} interleaved rounds; speedups divide times of the same round. "
             f"'vs DDIM {ref}' divides {records[0]['reference']}; 'vs no DC' the same sampler, steps "
             f"and backend without DeepCache (ONNX Runtime's: its full graph on every step).", "",
             "| backend | sampler, steps, DeepCache | prompt acc. | held out | FID (scorer) | PSNR to no-DC | "
             f"U-Net ms/image | total ms/image | U-Net vs DDIM {ref} | total vs DDIM {ref} | U-Net vs no DC |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        psnr = f"{r['psnr_to_baseline_db']:.1f} dB" if "psnr_to_baseline_db" in r else "-"
        lines.append(f"| {r['backend']} | {r['row']} | {r['prompt_accuracy']:.1%} | "
                     f"{r['held_out_scene_accuracy']:.1%} | {r['fid_scorer']:.2f} | {psnr} | "
                     f"{r['unet_ms_per_image']:.2f} | {r['total_ms_per_image']:.2f} | "
                     f"{r['unet_speedup_vs_reference']:.1f}x | {r['total_speedup_vs_reference']:.1f}x | "
                     f"{r['unet_speedup_vs_same_without_deepcache']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colours = {("ddim", False): "tab:blue", ("lcm", False): "tab:grey", ("lcm", True): "tab:red"}
    markers = {"eager": "o", "onnxruntime": "s"}
    for ax, key, label in ((axes[0], "prompt_accuracy", "prompt accuracy"), (axes[1], "fid_scorer", "FID (scorer)")):
        for r in records:
            ax.scatter(r["total_ms_per_image"], r[key] * (100 if key == "prompt_accuracy" else 1),
                       c=colours[r["sampler"], r["lora"]], marker=markers[r["backend"]],
                       alpha=1.0 if r["interval"] is None else 0.55, s=36)
            if r["backend"] == "eager" and r["interval"] in (None, 2) and r["branch"] == 0:
                name = f"{'LCM' if r['sampler'] == 'lcm' else 'DDIM'}{r['steps']}"
                name += ("" if r["interval"] is None else " N2") + ("" if r["lora"] or r["sampler"] == "ddim"
                                                                    else " noLoRA")
                ax.annotate(name,
                            (r["total_ms_per_image"], r[key] * (100 if key == "prompt_accuracy" else 1)),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("total ms per image (log)")
        ax.set_ylabel(label + (" %" if key == "prompt_accuracy" else ""))
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=lbl) for c, lbl in
               (("tab:blue", "DDIM (CFG 4)"), ("tab:red", "LCM-LoRA (no CFG)"), ("tab:grey", "LCM scheduler, no LoRA"))]
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", label=b) for b, m in markers.items()]
    axes[1].legend(handles=handles, fontsize=8)
    fig.suptitle(title + " (faded: with DeepCache)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import torch

    from dcaccel import shapes
    from dcaccel.models import trained_model_dir
    from dcaccel.shapes.evaluate import machine_text, write_results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--lora", default=str(REPO / "dcaccel" / "weights" / "shapes-lcm-lora" /
                                         "pytorch_lora_weights.safetensors"))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--lcm-steps", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--ddim-steps", type=int, default=20, help="the reference's steps (default 20)")
    p.add_argument("--seeds", type=int, default=2, help="images per caption (default 2: 240 images a row)")
    p.add_argument("--batch", type=int, default=40, help="images per pipeline call (and engine batch)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, help="default benchmarks/results/<date>-shapes-lcm-lora")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    runner = Runner(args.model, args.lora, args.batch, args.threads)
    scorer = shapes.load_scorer(trained_model_dir("shapes") if args.model == "shapes" else args.model)
    rows = plan(args.lcm_steps, ddim_steps=args.ddim_steps)
    try:
        records, meta = measure(runner, rows, args.backends, scorer, args.seeds, args.repeats)
    finally:
        runner.scratch.cleanup()  # the engines built for this run
    now = datetime.now(timezone.utc)
    out = args.out or REPO / "benchmarks" / "results" / f"{now:%Y-%m-%d}-shapes-lcm-lora"
    machine = machine_text(args.threads)
    header = (f"# LCM-LoRA after DeepCache on the shapes model\n\nMeasured {now:%Y-%m-%d %H:%M} UTC on {machine}: "
              f"`python benchmarks/lcm_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
              f"{records[0]['images']} images per row ({args.seeds} per caption), {args.batch} per call, fp32, "
              f"32x32 px. LoRA: {os.path.relpath(args.lora, REPO)}. DDIM rows use guidance 4 (classifier-free, "
              f"two U-Net batches a step); LCM rows guidance 1 (one).")
    write_results(out, records, meta, markdown(records, meta, header), now, machine)
    plot(records, out / "results.png", f"shapes model, {now:%Y-%m-%d}, {machine}")
    print(markdown(records, meta, header))
    print(f"wrote {out}/results.md, results.jsonl, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
