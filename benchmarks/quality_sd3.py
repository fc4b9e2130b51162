#!/usr/bin/env python
"""DeepCache's quality on a transformer, against cache-dit's caches, on the trained shapes-sd3 model: for each
setting, prompt accuracy, held-out-combination accuracy, FID (scorer) and PSNR to no cache, next to the speedup of
the transformer loop measured in the same run and the FLOP bound of what the setting actually ran.

Rows: dcaccel's DeepCache for every interval x head x tail; cache-dit 1.5.3's DBCache with dynamic residual
thresholds, DBCache with its TaylorSeer, FoCa and DMD calibrators, DBPrune (dynamic block pruning), and DBCache with
static step masks (cache-dit's steps_mask presets). Every row draws the same images (scene, seed) with the same
initial noise. The images go in batches; each batch is one round in which every row runs once, in an order
rotated from round to round, so speed ratios are measured side by side (median of the per-round ratios).
cache-dit decides per batch (one residual difference for the whole batch), and so it does here.

FLOP bound: forward hooks count the block calls each row made; FLOPs of every block and of the rest of the
transformer are counted once (FlopCounterMode), and the bound is the no-cache FLOPs over the row's FLOPs.

    python benchmarks/quality_sd3.py                       # the whole sweep (about 40 min on 2 cores)
    python benchmarks/quality_sd3.py --seeds 1 --quick     # a few rows, for a try
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# The paper's quality margin: 4.1x on LDM-4-G (ImageNet) "with a slight decrease of 0.22 in FID" (abstract), on a
# baseline FID of 3.37 (its ImageNet table): a relative FID increase of 6.5%.
PAPER_FID_MARGIN = 0.22 / 3.37
ACCURACY_MARGIN = 0.01  # one point of prompt accuracy
INTERVALS = (2, 3, 4, 5)
CUTS = ((1, 0), (0, 1), (1, 1), (2, 1), (1, 2), (2, 2))  # (head_blocks, tail_blocks)


@dataclass
class Row:
    label: str
    method: str                     # "none", "dcaccel DeepCache", "cache-dit DBCache", ...
    params: dict = field(default_factory=dict)

    def enable(self, pipe):
        if self.method == "dcaccel DeepCache":
            from dcaccel import pipeline as dc
            from dcaccel.config import DeepCacheConfig

            dc.enable(pipe, DeepCacheConfig(**self.params), "eager")
        elif self.method != "none":
            import cache_dit

            cache_dit.enable_cache(pipe, **cache_dit_options(self))

    def disable(self, pipe):
        if self.method == "dcaccel DeepCache":
            from dcaccel import pipeline as dc

            dc.disable(pipe)
        elif self.method != "none":
            import cache_dit

            cache_dit.disable_cache(pipe)


def cache_dit_options(row: Row) -> dict:
    """cache_dit.enable_cache keyword arguments for a cache-dit row (cache-dit 1.5.3's config classes)."""
    from cache_dit import (DBCacheConfig, DBPruneConfig, DMDCalibratorConfig, FoCaCalibratorConfig,
                           TaylorSeerCalibratorConfig, steps_mask)

    p = dict(row.params)
    common = {"Fn_compute_blocks": p.pop("Fn"), "Bn_compute_blocks": p.pop("Bn"),
              "max_warmup_steps": p.pop("warmup")}
    calibrator = p.pop("calibrator", None)
    if row.method == "cache-dit DBPrune":
        return {"cache_config": DBPruneConfig(residual_diff_threshold=p.pop("threshold"), **common)}
    if "mask" in p:
        mask = steps_mask(total_steps=p.pop("steps"), mask_policy=p.pop("mask"))
        config = DBCacheConfig(steps_computation_mask=mask, steps_computation_policy="static", **common)
    else:
        config = DBCacheConfig(residual_diff_threshold=p.pop("threshold"), **common)
    assert not p, f"unused parameters {p}"
    out = {"cache_config": config}
    if calibrator == "taylorseer":
        out["calibrator_config"] = TaylorSeerCalibratorConfig(taylorseer_order=1)
    elif calibrator == "foca":
        out["calibrator_config"] = FoCaCalibratorConfig()
    elif calibrator == "dmd":
        out["calibrator_config"] = DMDCalibratorConfig()
    return out


def default_rows(steps: int, quick: bool = False) -> list[Row]:
    rows = [Row("no cache", "none")]
    intervals, cuts = ((3,), ((1, 1),)) if quick else (INTERVALS, CUTS)
    for n, (h, t) in itertools.product(intervals, cuts):
        rows.append(Row(f"ours N={n} head {h} tail {t}", "dcaccel DeepCache",
                        {"interval": n, "head_blocks": h, "tail_blocks": t}))
    # cache-dit: F1B1 (its first and last block always run, as ours at head 1 tail 1), warm-up 4 of 20 steps
    # (its default of 8 would leave 12 steps to cache); thresholds on its relative L1 residual difference.
    base = {"Fn": 1, "Bn": 1, "warmup": max(1, steps // 5)}
    thresholds = (0.16,) if quick else (0.08, 0.16, 0.24, 0.32)
    for r in thresholds:
        rows.append(Row(f"DBCache F1B1 R={r}", "cache-dit DBCache", {**base, "threshold": r}))
    for r in ((0.24,) if quick else (0.16, 0.32)):
        rows.append(Row(f"DBCache+TaylorSeer F1B1 R={r}", "cache-dit DBCache+TaylorSeer",
                        {**base, "threshold": r, "calibrator": "taylorseer"}))
    if not quick:
        rows.append(Row("DBCache+FoCa F1B1 R=0.24", "cache-dit DBCache+FoCa",
                        {**base, "threshold": 0.24, "calibrator": "foca"}))
        rows.append(Row("DBCache+DMD F1B1 R=0.24", "cache-dit DBCache+DMD",
                        {**base, "threshold": 0.24, "calibrator": "dmd"}))
        for r in (0.04, 0.08, 0.16):
            rows.append(Row(f"DBPrune F1B1 R={r}", "cache-dit DBPrune", {**base, "threshold": r}))
        for policy in ("slow", "medium", "fast"):
            rows.append(Row(f"DBCache F1B1 steps mask {policy}", "cache-dit DBCache static mask",
                            {"Fn": 1, "Bn": 1, "warmup": 1, "mask": policy, "steps": steps}))
    return rows


class BlockCounter:
    """Forward pre-hooks on every transformer block: how often each ran since reset()."""

    def __init__(self, transformer):
        self.calls = [0] * len(transformer.transformer_blocks)
        blocks = transformer.transformer_blocks
        self.handles = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, i):
        def hook(module, args):
            self.calls[i] += 1
        return hook

    def reset(self):
        self.calls = [0] * len(self.calls)

    def close(self):
        for h in self.handles:
            h.remove()


def block_flops(transformer, pipe) -> tuple[list[int], int]:
    """FLOPs of each block and of the whole transformer for one call at the pipeline's shapes (batch 2, as with
    guidance), counted by FlopCounterMode per module."""
    from torch.utils.flop_counter import FlopCounterMode

    from dcaccel.bench.flops import sdpa_flop_formulas

    from dcaccel.families import get_family

    cfg = transformer.config
    size = cfg.sample_size
    text_len = get_family("mmdit").geometry(pipe)["text_len"]
    inputs = {"hidden_states": torch.randn(2, cfg.in_channels, size, size),
              "encoder_hidden_states": torch.randn(2, text_len, cfg.joint_attention_dim),
              "pooled_projections": torch.randn(2, cfg.pooled_projection_dim), "timestep": torch.tensor([500.0] * 2)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa_flop_formulas()) as counter:
        transformer(**inputs)
    by_module = counter.get_flop_counts()
    total = sum(by_module["Global"].values())
    prefix = next(k for k in by_module if k.endswith("transformer_blocks.0")).rsplit(".", 1)[0]
    per_block = [sum(by_module[f"{prefix}.{i}"].values()) for i in range(len(transformer.transformer_blocks))]
    return per_block, total


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better on both)."""
    return [i for i, (x, y) in enumerate(points)
            if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]


def recommend(records: list[dict], accuracy_margin: float = ACCURACY_MARGIN,
              fid_margin: float = PAPER_FID_MARGIN) -> dict | None:
    """The fastest dcaccel setting (measured transformer-loop speedup) that loses at most `accuracy_margin` of
    prompt accuracy and raises FID (scorer) by at most `fid_margin` (relative) against no cache."""
    base = records[0]
    ok = [r for r in records if r["method"] == "dcaccel DeepCache"
          and r["prompt_accuracy"] >= base["prompt_accuracy"] - accuracy_margin
          and r["fid_scorer"] <= base["fid_scorer"] * (1 + fid_margin)]
    return max(ok, key=lambda r: r["speedup_transformer"]) if ok else None


def sweep(pipe, scorer, rows: list[Row], seeds: int, steps: int, guidance: float, batch: int, progress=print,
          scenes: list | None = None):
    """(records, meta, images): one record per row, the first row being the reference (no cache); every row
    draws `scenes` (default: every caption) `seeds` times; images by row label, float NCHW in [-1, 1]."""
    from dcaccel.runtime import DenoiserTimer
    from dcaccel.shapes.data import all_scenes
    from dcaccel.shapes.evaluate import Reference
    from dcaccel.shapes.score import pipeline_images

    scenes = [s for _ in range(seeds) for s in (scenes or all_scenes())]
    ref = Reference(scorer, scenes)
    per_block, total = block_flops(pipe.transformer, pipe)
    rest = total - sum(per_block)
    counter = BlockCounter(pipe.transformer)
    images = {r.label: [] for r in rows}
    seconds = {r.label: [] for r in rows}
    flops = {r.label: 0 for r in rows}
    starts = list(range(0, len(scenes), batch))
    # one untimed call first (the process's first large call allocates), then every row once per round, the order
    # rotated by an even share of the rows each round so that no row always sits at the same place
    pipeline_images(pipe, scenes[:batch], seed=10_000, steps=steps, guidance_scale=guidance, batch=batch)
    try:
        for round_, start in enumerate(starts):
            chunk = scenes[start:start + batch]
            shift = round_ * len(rows) // len(starts)
            order = rows[shift:] + rows[:shift]
            for row in order:
                row.enable(pipe)
                try:
                    counter.reset()
                    with DenoiserTimer(pipe.transformer) as clock:
                        imgs = pipeline_images(pipe, chunk, seed=10_000 + start, steps=steps, guidance_scale=guidance,
                                               batch=len(chunk))
                finally:
                    row.disable(pipe)
                images[row.label].append(imgs)
                seconds[row.label].append(clock.seconds)
                flops[row.label] += steps * rest + sum(c * f for c, f in zip(counter.calls, per_block))
                progress(f"round {round_ + 1}/{len(starts)} {row.label}: transformer loop {clock.seconds:.1f} s, "
                         f"block calls {sum(counter.calls)}")
    finally:
        counter.close()

    base_label = rows[0].label
    images = {label: torch.cat(chunks) for label, chunks in images.items()}
    base = images[base_label]
    no_cache_flops = flops[base_label]
    records = []
    for row in rows:
        imgs = images[row.label]
        ratios = [b / t for b, t in zip(seconds[base_label], seconds[row.label])]
        records.append({
            "setting": row.label, "method": row.method, "params": row.params, "images": len(scenes), "steps": steps,
            "guidance": guidance, **ref.metrics(imgs, base),
            "transformer_seconds": sum(seconds[row.label]), "speedup_transformer": statistics.median(ratios),
            "speedup_rounds": ratios, "flop_bound": no_cache_flops / flops[row.label],
        })
    meta = {"fid_real_floor": ref.fid_floor, "real_images": ref.real_images, "rounds": len(starts),
            "batch": batch, "block_gflop": [f / 1e9 for f in per_block], "rest_gflop": rest / 1e9}
    return records, meta, images


def markdown(records: list[dict], meta: dict, header: str, best: dict | None) -> str:
    from dcaccel.shapes.score import chance_accuracy

    lines = [header, "",
             f"Prompt accuracy: all four attributes read back by the shapes scorer as the prompt asked (chance "
             f"{chance_accuracy():.1%}). Held out: the 12 attribute combinations the model never saw. FID (scorer): "
             f"Fréchet distance of scorer features to {meta['real_images']} real images; two real sets of this "
             f"size are {meta['fid_real_floor']:.2f} apart. PSNR: to the no-cache image of the same seed. Speedup: "
             f"no-cache transformer-loop seconds / the row's, median of {meta['rounds']} interleaved rounds. FLOP "
             f"bound: no-cache FLOPs / the FLOPs of the blocks the row actually ran (hooks count them).", "",
             "| setting | method | prompt acc. | held out | FID (scorer) | PSNR to no cache | speedup | FLOP bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        mark = " **(default)**" if best is not None and r["setting"] == best["setting"] else ""
        psnr = "-" if r["method"] == "none" else f"{r['psnr_to_baseline_db']:.1f} dB"
        held = "-" if r["held_out_scene_accuracy"] is None else f"{r['held_out_scene_accuracy']:.1%}"
        lines.append(f"| {r['setting']}{mark} | {r['method']} | {r['prompt_accuracy']:.1%} | "
                     f"{held} | {r['fid_scorer']:.2f} | {psnr} | "
                     f"{r['speedup_transformer']:.2f}x | {r['flop_bound']:.2f}x |")
    base = records[0]
    lines += ["", f"Rule for the transformer defaults: the fastest dcaccel setting with prompt accuracy >= "
                  f"{base['prompt_accuracy'] - ACCURACY_MARGIN:.1%} (no cache minus one point) and FID (scorer) <= "
                  f"{base['fid_scorer'] * (1 + PAPER_FID_MARGIN):.2f} (no cache + {PAPER_FID_MARGIN:.1%}, the "
                  f"paper's relative FID margin): "
                  + (f"**{best['setting']}** ({best['speedup_transformer']:.2f}x)." if best else "none qualifies.")]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    methods = list(dict.fromkeys(r["method"] for r in records))
    markers = dict(zip(methods, "o^sDvP*Xh"))
    for ax, key, better, name in ((axes[0], "prompt_accuracy", 1, "prompt accuracy"),
                                  (axes[1], "fid_scorer", -1, "FID (scorer), lower is better")):
        for m in methods:
            pts = [r for r in records if r["method"] == m]
            ax.scatter([r["speedup_transformer"] for r in pts], [r[key] for r in pts], marker=markers[m], label=m)
        front = sorted((records[i] for i in pareto([(r["speedup_transformer"], better * r[key]) for r in records])),
                       key=lambda r: r["speedup_transformer"])
        ax.plot([r["speedup_transformer"] for r in front], [r[key] for r in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel("transformer-loop speedup (measured, interleaved)")
        ax.set_ylabel(name)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import logging

    from dcaccel import shapes
    from dcaccel.models import load_pipeline, trained_model_dir
    from dcaccel.shapes.evaluate import machine_text, write_results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-sd3", help="shapes-sd3 or a local directory of such a model")
    p.add_argument("--seeds", type=int, default=3, help="images per caption (default 3: 360 images per row)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=shapes.GUIDANCE_SCALE)
    p.add_argument("--batch", type=int, default=120, help="images per pipeline call, i.e. per round")
    p.add_argument("--quick", action="store_true", help="one row per method")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, help="default benchmarks/results/<date>-shapes-sd3-quality")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import cache_dit

    for name in list(logging.root.manager.loggerDict):  # cache-dit logs every enable/disable at INFO to stdout
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.WARNING)

    pipe = load_pipeline(args.model)
    scorer = shapes.load_scorer(trained_model_dir("shapes"))
    rows = default_rows(args.steps, args.quick)
    records, meta, _ = sweep(pipe, scorer, rows, args.seeds, args.steps, args.guidance, args.batch)
    best = recommend(records)
    now = datetime.now(timezone.utc)
    out = args.out or REPO / "benchmarks" / "results" / f"{now:%Y-%m-%d}-shapes-sd3-quality"
    machine = machine_text(args.threads)
    header = (f"# DeepCache on a transformer against cache-dit, on the shapes-sd3 model\n\nMeasured "
              f"{now:%Y-%m-%d %H:%M} UTC on {machine}, cache-dit {cache_dit.__version__}: `python "
              f"benchmarks/quality_sd3.py{''.join(' ' + a for a in (argv if argv is not None else sys.argv[1:]))}`; "
              f"FlowMatchEulerDiscreteScheduler {args.steps} steps, guidance {args.guidance}, "
              f"{records[0]['images']} images per row ({meta['rounds']} rounds of {args.batch}), eager.")
    meta = {**meta, "recommended": best["setting"] if best else None, "paper_fid_margin": PAPER_FID_MARGIN,
            "accuracy_margin": ACCURACY_MARGIN, "cache_dit": cache_dit.__version__}
    table = markdown(records, meta, header, best)
    write_results(out, records, meta, table, now, machine)
    plot(records, out / "results.png", f"shapes-sd3, {args.steps} steps, {machine}")
    print(table)
    print(f"wrote {out}/results.md, results.jsonl and results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
