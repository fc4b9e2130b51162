#!/usr/bin/env python
"""Calibrated schedules against today's schedules and the peers, on the trained shapes models, on prompts and
seeds the calibration never saw: every caption but the 11 calibration captions (dcaccel.shapes.data
.evaluation_scenes: 109, the 12 held-out combinations among them), seeds 10000+.

Rows: no cache; dcaccel uniform and non-uniform schedules; dcaccel calibrated at several budgets (the shipped
calibration, dcaccel/weights/<model>/calibration.json), with and without forecasting the cached feature; on
shapes-sd3 dcaccel's dynamic schedule (a probe of the first block decides per step) at three thresholds; the
peers that run on the model: cache-dit 1.5.3 (DBCache at two thresholds, with TaylorSeer, DBPrune, a static
mask) on shapes-sd3, DeepCacheSDHelper (the reference DeepCache) on the shapes U-Net. Per row: prompt accuracy,
held-out accuracy, FID (scorer), PSNR to the no-cache image of the same seed, the denoiser-loop speedup measured
interleaved (every row once per round, order rotated, median of the per-round ratios) and the FLOP bound.

    python benchmarks/calibration.py --model shapes-sd3
    python benchmarks/calibration.py --model shapes
    python benchmarks/calibration.py --model shapes-sd3 --backend onnxruntime   # dcaccel rows on ONNX Runtime
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402


@dataclass
class Row:
    label: str
    method: str
    params: dict = field(default_factory=dict)
    helper: object = None
    engine_dir: str | None = None  # dcaccel rows on ONNX Runtime: the engines built for this cut

    def enable(self, pipe):
        if self.method.startswith("dcaccel"):
            import dcaccel

            options = {} if self.engine_dir is None else {"engine_dir": self.engine_dir}
            params = dict(self.params)
            order = params.pop("forecast_order", 0)
            config = dcaccel.DeepCacheConfig(**params)
            dcaccel.enable(pipe, config, "eager" if self.engine_dir is None else "onnxruntime", **options)
            if order:  # forecasting is no config option (it did not move the front): installed as a policy
                from dcaccel.policies import ForecastPolicy, use_policy

                use_policy(pipe, ForecastPolicy(config, order))
        elif self.method == "DeepCacheSDHelper":
            from DeepCache import DeepCacheSDHelper

            self.helper = DeepCacheSDHelper(pipe=pipe)
            self.helper.set_params(cache_interval=self.params["interval"], cache_branch_id=self.params["branch"])
            self.helper.enable()
        elif self.method.startswith("cache-dit"):
            import cache_dit
            from quality_sd3 import Row as SD3Row, cache_dit_options

            cache_dit.enable_cache(pipe, **cache_dit_options(SD3Row(self.label, self.method, dict(self.params))))

    def disable(self, pipe):
        if self.method.startswith("dcaccel"):
            import dcaccel

            dcaccel.disable(pipe)
        elif self.method == "DeepCacheSDHelper":
            self.helper.disable()
        elif self.method.startswith("cache-dit"):
            import cache_dit

            cache_dit.disable_cache(pipe)


def rows_for(model: str, calibration: str, cut: dict, steps: int) -> list[Row]:
    # the second row measures FID's noise: the same uncached model on other seeds (its PSNR means nothing)
    rows = [Row("no cache", "none"), Row("no cache, other seeds (FID noise)", "none", {"seed_offset": 10_000})]
    intervals = (2, 3, 4) if model == "shapes-sd3" else (2, 3, 5)
    for n in intervals:
        rows.append(Row(f"ours uniform N={n}", "dcaccel uniform", {"interval": n, **cut}))
    rows.append(Row("ours non-uniform N=3", "dcaccel non-uniform", {"interval": 3, "schedule": "nonuniform", **cut}))
    budgets = (4, 5, 6, 7, 8, 10) if model == "shapes-sd3" else (4, 5, 7, 10, 13)
    for k in budgets:
        rows.append(Row(f"ours calibrated {k} full", "dcaccel calibrated",
                        {"schedule": "calibrated", "calibration": calibration, "num_full_steps": k, **cut}))
    rows.append(Row("ours uniform N=3 + forecast 1", "dcaccel uniform + forecast",
                    {"interval": 3, "forecast_order": 1, **cut}))
    for k, order in ((5, 1), (7, 1), (7, 2)):
        rows.append(Row(f"ours calibrated {k} full + forecast {order}", "dcaccel calibrated + forecast",
                        {"schedule": "calibrated", "calibration": calibration, "num_full_steps": k,
                         "forecast_order": order, **cut}))
    if model == "shapes-sd3":
        # the dynamic alternative: a probe of the first block decides per step (cache-dit's rule), warm-up as theirs
        for r in (0.16, 0.24, 0.32):
            rows.append(Row(f"ours dynamic probe R={r}", "dcaccel dynamic",
                            {"schedule": "dynamic", "threshold": r, "cache_start": max(1, steps // 5), **cut}))
        base = {"Fn": 1, "Bn": 1, "warmup": max(1, steps // 5)}
        for r in (0.24, 0.32):
            rows.append(Row(f"cache-dit DBCache F1B1 R={r}", "cache-dit DBCache", {**base, "threshold": r}))
        rows.append(Row("cache-dit DBCache+TaylorSeer F1B1 R=0.32", "cache-dit DBCache+TaylorSeer",
                        {**base, "threshold": 0.32, "calibrator": "taylorseer"}))
        rows.append(Row("cache-dit DBPrune F1B1 R=0.16", "cache-dit DBPrune", {**base, "threshold": 0.16}))
        rows.append(Row("cache-dit static mask fast", "cache-dit DBCache static mask",
                        {"Fn": 1, "Bn": 1, "warmup": 1, "mask": "fast", "steps": steps}))
    else:
        for n in (3, 5):
            rows.append(Row(f"DeepCacheSDHelper N={n}", "DeepCacheSDHelper", {"interval": n, "branch": 0}))
    return rows


def sweep(pipe, scorer, rows, scenes, steps, guidance, rounds, cal, progress=print):
    """One record per row (the first is no cache): metrics on all images, speed as the median per-round ratio."""
    import dcaccel
    from dcaccel.runtime import DenoiserTimer
    from dcaccel.schedule import full_steps as schedule_full_steps
    from dcaccel.shapes.evaluate import Reference
    from dcaccel.shapes.score import pipeline_images

    attr = "transformer" if hasattr(pipe, "transformer") else "unet"
    counter = per_block = rest = None
    probe_fraction = 0.0
    if attr == "transformer":
        from quality_sd3 import BlockCounter, block_flops

        per_block, total = block_flops(pipe.transformer, pipe)
        rest = total - sum(per_block)
        probe_fraction = per_block[0] / total  # the embeddings' share is not counted (small)
        counter = BlockCounter(pipe.transformer)
    ref = Reference(scorer, scenes)
    size = -(-len(scenes) // rounds)
    chunks = [(start, scenes[start:start + size]) for start in range(0, len(scenes), size)]
    images = {r.label: [] for r in rows}
    seconds = {r.label: [] for r in rows}
    flops = {r.label: 0.0 for r in rows}
    fraction = cal.data["shallow_fraction"]
    pipeline_images(pipe, scenes[:size], seed=20_000, steps=steps, guidance_scale=guidance, batch=size)  # warm-up
    try:
        for round_, (start, chunk) in enumerate(chunks):
            shift = round_ * len(rows) // len(chunks)
            for row in rows[shift:] + rows[:shift]:
                row.enable(pipe)
                try:
                    if counter is not None:
                        counter.reset()
                    with DenoiserTimer(getattr(pipe, attr)) as clock:
                        imgs = pipeline_images(pipe, chunk, seed=10_000 + start + row.params.get("seed_offset", 0),
                                               steps=steps,
                                               guidance_scale=guidance, batch=len(chunk))
                    if row.method.startswith("dcaccel"):
                        n_full = len(dcaccel.last_stats(pipe).full_steps)
                        flops[row.label] += n_full + (steps - n_full) * fraction
                        if row.method == "dcaccel dynamic":  # the probe: embeddings and the first block, every step
                            flops[row.label] += steps * probe_fraction
                    elif row.method == "DeepCacheSDHelper":
                        n_full = len(schedule_full_steps(dcaccel.DeepCacheConfig(interval=row.params["interval"]),
                                                         steps))
                        flops[row.label] += n_full + (steps - n_full) * fraction
                    elif row.method == "none":
                        flops[row.label] += steps
                    else:  # cache-dit: the blocks it ran, counted by hooks
                        ran = steps * rest + sum(c * f for c, f in zip(counter.calls, per_block))
                        flops[row.label] += steps * ran / (steps * (rest + sum(per_block)))
                finally:
                    row.disable(pipe)
                images[row.label].append(imgs)
                seconds[row.label].append(clock.seconds)
                progress(f"round {round_ + 1}/{len(chunks)} {row.label}: loop {clock.seconds:.1f} s")
    finally:
        if counter is not None:
            counter.close()
    base_label = rows[0].label
    images = {k: torch.cat(v) for k, v in images.items()}
    records = []
    for row in rows:
        ratios = [b / t for b, t in zip(seconds[base_label], seconds[row.label])]
        params = {k: (v if k != "calibration" else os.path.relpath(v, REPO)) for k, v in row.params.items()}
        records.append({"setting": row.label, "method": row.method, "params": params, "images": len(scenes),
                        **ref.metrics(images[row.label], images[base_label]),
                        "loop_seconds": sum(seconds[row.label]), "speedup": statistics.median(ratios),
                        "speedup_rounds": ratios, "flop_bound": flops[base_label] / flops[row.label]})
    return records, {"fid_real_floor": ref.fid_floor, "real_images": ref.real_images, "rounds": len(chunks)}


def dominance(records: list[dict]) -> list[dict]:
    """For every peer row: the calibrated dcaccel rows that dominate it (speedup, PSNR at least the peer's; FID and
    accuracy no worse)."""
    ours = [r for r in records if r["method"] == "dcaccel calibrated"]
    noise = abs(records[1]["fid_scorer"] - records[0]["fid_scorer"]) if records[1]["method"] == "none" else 0.0
    out = []
    for p in records:
        if p["method"] == "none" or (p["method"].startswith("dcaccel") and p["method"] != "dcaccel dynamic"):
            continue

        def beats(r, slack):
            return (r["speedup"] >= p["speedup"] and r["psnr_to_baseline_db"] >= p["psnr_to_baseline_db"]
                    and r["fid_scorer"] <= p["fid_scorer"] + slack and r["prompt_accuracy"] >= p["prompt_accuracy"])

        out.append({"peer": p["setting"], "dominated_by": [r["setting"] for r in ours if beats(r, 0.0)],
                    "dominated_within_fid_noise": [r["setting"] for r in ours if beats(r, noise)],
                    "fid_noise": noise})
    return out


def markdown(records, meta, header, dom) -> str:
    lines = [header, "",
             f"PSNR: to the no-cache image of the same prompt and seed. FID (scorer): Fréchet distance of scorer "
             f"features to {meta['real_images']} real images (two real sets of this size: {meta['fid_real_floor']:.2f}"
             f"). Speedup: no-cache denoiser-loop seconds over the row's, median of {meta['rounds']} interleaved "
             "rounds. FLOP bound: no-cache FLOPs over the row's.", "",
             "| setting | prompt acc. | held out | FID (scorer) | PSNR | speedup | FLOP bound |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        psnr = "-" if r["method"] == "none" else f"{r['psnr_to_baseline_db']:.1f} dB"
        if r["method"] == "none" and r is not records[0]:
            r = {**r, "speedup": float("nan"), "flop_bound": float("nan")}
        held = "-" if r["held_out_scene_accuracy"] is None else f"{r['held_out_scene_accuracy']:.1%}"
        lines.append(f"| {r['setting']} | {r['prompt_accuracy']:.1%} | {held} | {r['fid_scorer']:.2f} | {psnr} | "
                     f"{r['speedup']:.2f}x | {r['flop_bound']:.2f}x |")
    if dom:
        lines += ["", "Peers dominated by a calibrated row (speedup and PSNR at least the peer's, FID and prompt "
                      "accuracy no worse):", ""]
        for d in dom:
            lines.append(f"- {d['peer']}: " + (", ".join(d["dominated_by"]) if d["dominated_by"] else "**none**"))
        lines += ["", f"The same with FID allowed to be worse by its noise in this run ({dom[0]['fid_noise']:.2f}: "
                      "the FID difference between no cache on two seed sets):", ""]
        for d in dom:
            lines.append(f"- {d['peer']}: " + (", ".join(d["dominated_within_fid_noise"])
                                               if d["dominated_within_fid_noise"] else "**none**"))
    return "\n".join(lines) + "\n"


def plot(records, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != "none"))
    markers = dict(zip(methods, "o^sDvP*Xh<>"))
    for ax, key, name in ((axes[0], "psnr_to_baseline_db", "PSNR to no cache (dB), higher is better"),
                          (axes[1], "fid_scorer", "FID (scorer), lower is better")):
        for m in methods:
            pts = [r for r in records if r["method"] == m]
            ax.scatter([r["speedup"] for r in pts], [r[key] for r in pts], marker=markers[m], label=m)
        ax.set_xlabel("denoiser-loop speedup (measured, interleaved)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].axhline(records[0]["fid_scorer"], color="k", lw=0.8, ls=":", label="no cache")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import logging

    from dcaccel import shapes
    from dcaccel.calibration import Calibration
    from dcaccel.models import load_pipeline, shipped_calibration
    from dcaccel.shapes.data import evaluation_scenes
    from dcaccel.shapes.evaluate import machine_text, write_results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-sd3", choices=("shapes-sd3", "shapes"))
    p.add_argument("--calibration", help="default: the shipped one")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="eager", choices=("eager", "onnxruntime"),
                   help="where dcaccel's rows run (the peers and the no-cache baseline stay eager)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model == "shapes-sd3":
        import cache_dit  # noqa: F401 (its loggers exist once imported: it logs every enable/disable at INFO)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.WARNING)
    calibration = args.calibration or shipped_calibration(args.model)
    cal = Calibration.load(calibration)
    cut = cal.valid_for["cut"]
    pipe = load_pipeline(args.model)
    scorer = shapes.load_scorer()
    scenes = evaluation_scenes()
    rows = rows_for(args.model, calibration, cut, args.steps)
    engines_tmp = None
    if args.backend == "onnxruntime":
        # static shapes: equal rounds (108 of the 109 captions), dcaccel rows on engines built once for that batch;
        # the peers cannot run there and stay eager; the no-cache row stays the plain eager pipeline
        import tempfile

        from dcaccel.config import BuildConfig
        from dcaccel.engines import build_engines
        from dcaccel.models import default_resolution

        scenes = scenes[:len(scenes) - len(scenes) % args.rounds]
        engines_tmp = tempfile.mkdtemp(prefix="dcaccel-bench-engines-")
        size = default_resolution(pipe)
        engine_dir, _ = build_engines(pipe, BuildConfig(height=size, width=size, batch_size=len(scenes) // args.rounds,
                                                        backend="onnxruntime", **cut), out_dir=engines_tmp,
                                      model_name=args.model)
        for row in rows:
            if row.method.startswith("dcaccel"):
                row.engine_dir = str(engine_dir)
        rows.insert(2, Row("ours ONNX Runtime, no cache", "dcaccel uniform", {"interval": 1, **cut},
                           engine_dir=str(engine_dir)))
    records, meta = sweep(pipe, scorer, rows, scenes, args.steps, shapes.GUIDANCE_SCALE, args.rounds, cal)
    dom = dominance(records)
    now = datetime.now(timezone.utc)
    if engines_tmp is not None:
        import shutil

        shutil.rmtree(engines_tmp, ignore_errors=True)
    suffix = "" if args.backend == "eager" else f"-{args.backend}"
    out = args.out or REPO / "benchmarks" / "results" / f"{now:%Y-%m-%d}-{args.model}-calibration{suffix}"
    machine = machine_text(args.threads)
    header = (f"# Calibrated schedules on {args.model}, against uniform schedules and the peers\n\nMeasured "
              f"{now:%Y-%m-%d %H:%M} UTC on {machine}: `python benchmarks/calibration.py --model {args.model}`; "
              f"{type(pipe.scheduler).__name__} {args.steps} steps, guidance {shapes.GUIDANCE_SCALE}, "
              f"{len(scenes)} evaluation captions (none of the 11 calibrated on) x 1 seed (10000+), dcaccel rows "
              f"on {args.backend} (peers and no cache eager); "
              f"calibration {os.path.relpath(calibration, REPO)} ({cut}).")
    meta = {**meta, "dominance": dom, "calibration": os.path.relpath(calibration, REPO)}
    table = markdown(records, meta, header, dom)
    write_results(out, records, meta, table, now, machine)
    plot(records, out / "results.png", f"{args.model}, {args.steps} steps, held-out prompts, {machine}")
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
