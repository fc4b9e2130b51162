"""DeepCache's cost in quality, measured the way the paper does on SD but on the shapes model: for each setting,
prompt accuracy (CLIP score's role) and a Fréchet distance on scorer features (FID's role), with and without
DeepCache on the same prompts and seeds, next to the speedup measured in the same run."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .. import pipeline as dc
from ..config import DeepCacheConfig
from ..runtime import DenoiserTimer
from . import GUIDANCE_SCALE
from .data import Scene, all_scenes, held_out_scenes, make_dataset, to_tensor
from .score import accuracy, chance_accuracy, features, frechet_distance, pipeline_images, psnr

DEFAULT_SETTINGS = (
    [DeepCacheConfig(interval=n, branch=0) for n in (2, 3, 5, 10)]
    + [DeepCacheConfig(interval=3, branch=b) for b in range(1, 9)]
    + [DeepCacheConfig(interval=n, branch=0, schedule="nonuniform") for n in (3, 5)]
)


def label(config: DeepCacheConfig | None) -> str:
    if config is None:
        return "no DeepCache"
    return f"N={config.interval} B={config.branch} {config.schedule}"


def generate(pipe, config: DeepCacheConfig | None, scenes: list[Scene], seed: int, steps: int, guidance: float,
             backend: str = "eager", batch: int = 64, warmup: bool = False, **options):
    """Images for `scenes` (seed per image: seed + index) and the seconds spent in the U-Net loop and overall
    (pipeline calls only: enabling, which opens a backend's engines, is not counted). config None: the plain
    pipeline; else DeepCache on `backend` (`options` go to dcaccel.enable: engine_dir=... for engines).
    warmup: one untimed call on the first batch first (a backend's first call allocates its buffers)."""
    if config is None:
        if warmup:
            pipeline_images(pipe, scenes[:batch], seed, steps, guidance, batch=batch)
        start = time.perf_counter()
        with DenoiserTimer(pipe.unet) as clock:
            images = pipeline_images(pipe, scenes, seed, steps, guidance, batch=batch)
        return images, clock.seconds, time.perf_counter() - start
    dc.enable(pipe, config, backend, **options)
    if warmup:
        try:
            pipeline_images(pipe, scenes[:batch], seed, steps, guidance, batch=batch)
        except BaseException:
            dc.disable(pipe)
            raise
    unet_seconds = 0.0

    def add_batch():  # the U-Net loop of every pipeline call
        nonlocal unet_seconds
        unet_seconds += dc.last_stats(pipe).unet_seconds

    start = time.perf_counter()
    try:
        images = pipeline_images(pipe, scenes, seed, steps, guidance, batch=batch, after_batch=add_batch)
    finally:
        dc.disable(pipe)
    return images, unet_seconds, time.perf_counter() - start


class Reference:
    """What every row is scored against: real images' scorer features (FID's reference set), the distance
    between two real sets of the generated set's size (FID's floor), and which scenes are held out."""

    def __init__(self, scorer, scenes: list[Scene], real_images: int = 1200):
        self.scorer, self.scenes, self.real_images = scorer, scenes, real_images
        held = set(held_out_scenes())
        self.held_mask = torch.tensor([s in held for s in scenes])
        real_np, _ = make_dataset(real_images, seed=1, scenes=all_scenes())
        self.real_feats = features(scorer, to_tensor(real_np))
        floor_np, _ = make_dataset(len(scenes), seed=2, scenes=all_scenes())
        self.fid_floor = frechet_distance(features(scorer, to_tensor(floor_np)), self.real_feats)

    def metrics(self, images: torch.Tensor, base: torch.Tensor | None = None) -> dict:
        """Prompt accuracy (all attributes and each), held-out-scene accuracy, FID (scorer), and against `base`
        (the same prompts and seeds without DeepCache): agreement of the scorer's readings and PSNR."""
        acc = accuracy(self.scorer, images, self.scenes)
        held_scenes = [s for s, h in zip(self.scenes, self.held_mask) if h]
        held = accuracy(self.scorer, images[self.held_mask], held_scenes)["all"] if held_scenes else None
        out = {"prompt_accuracy": acc["all"], "attribute_accuracy": {k: v for k, v in acc.items() if k != "all"},
               "held_out_scene_accuracy": held, "held_out_images": len(held_scenes),
               "fid_scorer": frechet_distance(features(self.scorer, images), self.real_feats)}
        if base is not None:
            out["agreement_with_baseline"] = float(np.mean(_readings(self.scorer, images)
                                                           == _readings(self.scorer, base)))
            out["psnr_to_baseline_db"] = psnr(images, base)
        return out


def quality_sweep(pipe, scorer, settings=DEFAULT_SETTINGS, seeds: int = 3, steps: int = 20,
                  guidance: float = GUIDANCE_SCALE, real_images: int = 1200, repeats: int = 1, progress=print,
                  scenes: list[Scene] | None = None):
    """One record per setting (the first is no DeepCache). Every setting sees every scene (or `scenes`) `seeds`
    times with the same initial noise. Speed: the U-Net loop and total seconds of the whole set, the median of `repeats`
    runs, as a ratio to the no-DeepCache run of the same round (rounds interleave the settings)."""
    scenes = [s for _ in range(seeds) for s in (scenes or all_scenes())]
    ref = Reference(scorer, scenes, real_images)
    configs = [None] + list(settings)
    times = {label(c): [] for c in configs}
    images = {}
    for round_ in range(repeats):
        for config in configs:
            imgs, unet_s, total_s = generate(pipe, config, scenes, seed=10_000, steps=steps, guidance=guidance)
            times[label(config)].append((unet_s, total_s))
            if round_ == 0:
                images[label(config)] = imgs
            progress(f"round {round_ + 1}/{repeats} {label(config)}: U-Net loop {unet_s:.1f} s, total {total_s:.1f} s")

    base = images[label(None)]
    records = []
    for config in configs:
        name = label(config)
        records.append({
            "setting": name, "config": None if config is None else config.to_dict(),
            "images": len(scenes), "steps": steps, "guidance": guidance,
            **ref.metrics(images[name], base),
            "unet_seconds": statistics.median(t[0] for t in times[name]),
            "total_seconds": statistics.median(t[1] for t in times[name]),
            "speedup_unet": statistics.median(b[0] / t[0] for b, t in zip(times[label(None)], times[name])),
            "speedup_total": statistics.median(b[1] / t[1] for b, t in zip(times[label(None)], times[name])),
        })
    meta = {"chance_accuracy": chance_accuracy(), "fid_real_floor": ref.fid_floor, "real_images": real_images,
            "repeats": repeats}
    return records, meta


def _readings(scorer, images) -> np.ndarray:
    from .score import predict

    pred = predict(scorer, images)
    return np.stack([pred[k].numpy() for k in sorted(pred)], 1).astype(np.int64) @ np.array([1, 10, 100, 1000])


def markdown(records: list[dict], meta: dict, header: str) -> str:
    lines = [header, "",
             f"Prompt accuracy: all four attributes (shape, colour, size, position) read back by the scorer as the "
             f"prompt asked; chance {meta['chance_accuracy']:.1%}. FID (scorer): Fréchet distance between scorer "
             f"features of the generated images and {meta['real_images']} held-out real images; two real sets "
             f"of the same size as the generated one are {meta['fid_real_floor']:.2f} apart. Held-out scenes: "
             f"attribute combinations the model never saw in training. Agreement: images the scorer reads exactly "
             f"as it reads the no-DeepCache image of the same seed. Speedup: no-DeepCache seconds / these seconds, "
             f"the same images in the same run (median of {meta['repeats']} interleaved rounds).", "",
             "| setting | prompt acc. | held-out scenes | FID (scorer) | agreement | PSNR to no-DC | "
             "U-Net speedup | total speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        held = "-" if r["held_out_scene_accuracy"] is None else f"{r['held_out_scene_accuracy']:.1%}"
        lines.append(f"| {r['setting']} | {r['prompt_accuracy']:.1%} | {held} | "
                     f"{r['fid_scorer']:.2f} | {r['agreement_with_baseline']:.1%} | "
                     f"{'-' if r['config'] is None else format(r['psnr_to_baseline_db'], '.1f') + ' dB'} | "
                     f"{r['speedup_unet']:.2f}x | {r['speedup_total']:.2f}x |")
    return "\n".join(lines) + "\n"


def machine_text(threads: int) -> str:
    """Where a quality table was measured, for its header and records."""
    import os
    import platform

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{threads} threads")


def write_results(out, records: list[dict], meta: dict, table: str, now, machine: str) -> None:
    """results.jsonl (every record with the run's meta, date and machine) and results.md (`table`) in `out`."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({**r, **meta, "date": now.isoformat(timespec="seconds"), "machine": machine}) + "\n")
    (out / "results.md").write_text(table)
