#!/usr/bin/env python
"""DeepCache's quality cost on the trained shapes model: prompt accuracy and FID (scorer) with and without
DeepCache on the same prompts and seeds, next to the speedup measured in the same run, for each interval, branch
and schedule. Writes results.jsonl and results.md to benchmarks/results/<date>-shapes-quality/.

    python benchmarks/quality.py                 # the default sweep (14 settings + no DeepCache, 3 seeds per scene)
    python benchmarks/quality.py --seeds 1 --repeats 1 --settings 3:0 5:0
    python benchmarks/quality.py --model DIR --scorer shapes   # a model trained elsewhere, judged by the shipped scorer
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_setting(text: str):
    """N:B or N:B:nonuniform"""
    from dcaccel.config import DeepCacheConfig

    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"setting {text!r}: expected N:B or N:B:SCHEDULE, e.g. 3:0 or 3:0:nonuniform")
    try:
        return DeepCacheConfig(interval=int(parts[0]), branch=int(parts[1]),
                               schedule=parts[2] if len(parts) == 3 else "uniform")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"setting {text!r}: {e}")


def main(argv=None) -> int:
    import torch

    from dcaccel import shapes
    from dcaccel.models import load_pipeline
    from dcaccel.shapes.evaluate import DEFAULT_SETTINGS, machine_text, markdown, quality_sweep, write_results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="the shapes model, or a local directory of one")
    p.add_argument("--scorer", help="whose scorer judges the images: shapes (the shipped one) or a model "
                                    "directory with scorer/ (default: the one beside --model); one scorer for two "
                                    "models makes their numbers comparable")
    p.add_argument("--settings", nargs="+", type=parse_setting, help="N:B[:schedule] (default: 14 settings)")
    p.add_argument("--seeds", type=int, default=3, help="images per scene (default 3: 360 images)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, help="default benchmarks/results/<date>-shapes-quality")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    scorer_model = args.scorer or args.model
    try:  # before the pipeline: a wrong directory is refused at once
        scorer = shapes.load_scorer(None if scorer_model == "shapes" else scorer_model)
    except FileNotFoundError as e:
        p.error(str(e))
    pipe = load_pipeline(args.model)
    records, meta = quality_sweep(pipe, scorer, args.settings or DEFAULT_SETTINGS, seeds=args.seeds,
                                  steps=args.steps, repeats=args.repeats)
    meta.update(model=args.model, scorer=scorer_model)
    now = datetime.now(timezone.utc)
    out = args.out or REPO / "benchmarks" / "results" / f"{now:%Y-%m-%d}-shapes-quality"
    machine = machine_text(args.threads)
    header = (f"# DeepCache quality on the shapes model\n\nMeasured {now:%Y-%m-%d %H:%M} UTC on {machine}: "
              f"`python benchmarks/quality.py {' '.join(argv or sys.argv[1:])}`, DDIM {args.steps} steps, "
              f"guidance {records[0]['guidance']}, {records[0]['images']} images per setting, eager backend; "
              f"model {args.model}, judged by the scorer of {scorer_model}.")
    write_results(out, records, meta, markdown(records, meta, header), now, machine)
    print(markdown(records, meta, header))
    print(f"wrote {out / 'results.md'} and results.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
