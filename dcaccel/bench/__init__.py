"""`dcaccel bench`: latency, memory and fidelity of DeepCache on each backend, measured in one run against the
plain diffusers pipeline, each backend's own no-cache run and the family's peers (the reference
DeepCacheSDHelper for U-Nets; cache-dit's DBCache, plain and with torch.compile, for SD 3.x).

One run: load a pipeline (or build an embedded architecture with random weights) -> plan the configurations ->
warm each one up (build or compile once, one untimed call whose latents give the fidelity) -> time them in
interleaved rounds (every configuration once per round, so drift on a shared machine hits all rows alike) ->
one record per configuration and step count -> results.jsonl, results.md, results.png, and in sweep mode
recommendation.json.

Every number in a record was measured in this run or computed from measured numbers and FLOP counts; a
configuration that did not run has status "not run: <why>" or "failed: <error>" and no numbers.
See benchmarks/README.md for the fields.

    flops.py     FLOPs of the split graphs and the bound they set
    fidelity.py  latent rel L2, PSNR, SSIM
    memory.py    peak memory
    plan.py      the configurations
    timing.py    hook timers, measurements
    run.py       the run
    report.py    derived fields, recommendation, Markdown, plot
"""

from __future__ import annotations

import argparse
import logging

import torch

from ..models import ARCHITECTURES
from .fidelity import psnr, rel_l2, ssim
from .flops import count_flops, graph_flops, sdpa_flop_formulas, sdpa_flops, theoretical_speedup
from .plan import PEER_LABELS
from .report import _bound_text, markdown_table, recommend
from .run import BACKENDS, BENCH_SCHEDULES, DEFAULT_PROMPT, SCHEDULERS, Bench

__all__ = ["Bench", "add_arguments", "count_flops", "graph_flops", "main", "psnr", "recommend", "rel_l2", "run",
           "sdpa_flop_formulas", "sdpa_flops", "ssim", "theoretical_speedup"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dcaccel bench` (and benchmarks/run.py)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="local diffusers pipeline directory (or an embedded architecture name)")
    model.add_argument("--arch", choices=ARCHITECTURES,
                       help="embedded architecture with random weights (default tiny when no --model)")
    model.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                       help="fuse this LoRA first, via dcaccel.lora (repeatable)")
    model.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    model.add_argument("--controlnets", type=int, default=0, metavar="K",
                       help="with --arch: the ControlNet pipeline with K random ControlNets (default 0: none)")
    model.add_argument("--controlnet-cut", choices=("cut", "whole", "both"), default="both",
                       help="ControlNet pipelines: DeepCache rows with the ControlNet cut at the branch, run whole "
                            "on cached steps, or both (default both)")

    matrix = parser.add_argument_group("matrix")
    matrix.add_argument("--backends", nargs="+", choices=BACKENDS,
                        help="default: all (tensorrt gives a 'not run' row without CUDA/TensorRT); "
                             "eager only with --sweep. Eager's no-cache run is always measured.")
    matrix.add_argument("--interval", nargs="+", metavar="N",
                        help="DeepCache intervals (default 3; sweep: 2 3 4 5)")
    matrix.add_argument("--branch", nargs="+", metavar="B", help="U-Nets: skip branches (default 0; sweep: 0 1 2)")
    matrix.add_argument("--head-blocks", nargs="+", metavar="H",
                        help="SD 3.x: first blocks run on cached steps (default 1; sweep: 0 1 2)")
    matrix.add_argument("--tail-blocks", nargs="+", metavar="T",
                        help="SD 3.x: last blocks run on cached steps (default 1; sweep: 0 1 2); the cuts are "
                             "--head-blocks x --tail-blocks")
    matrix.add_argument("--schedule", nargs="+", choices=BENCH_SCHEDULES,
                        help="default uniform; sweep: uniform nonuniform")
    matrix.add_argument("--peers", nargs="+", choices=sorted(PEER_LABELS),
                        help="which peers to run (default: all of the model family's)")
    matrix.add_argument("--no-reference", action="store_true",
                        help="skip the peers' rows (DeepCacheSDHelper for U-Nets; cache-dit, plain and with "
                             "torch.compile, for SD 3.x)")

    call = parser.add_argument_group("pipeline call")
    call.add_argument("--height", type=int, help="default: the model's default resolution")
    call.add_argument("--width", type=int)
    call.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    call.add_argument("--steps", nargs="+", default=["20"], metavar="N", help="denoising steps (default 20); "
                      "several give one table each")
    call.add_argument("--guidance", type=float, help="guidance scale (default 7.5; 7 for SD 3.x)")
    call.add_argument("--scheduler", choices=sorted(SCHEDULERS),
                      help="U-Nets: replace the model's scheduler (default: keep it; DDIM for the embedded ones)")
    call.add_argument("--prompt", default=DEFAULT_PROMPT)
    call.add_argument("--seed", type=int, default=0, help="noise seed; the same for every call")

    timing = parser.add_argument_group("timing and output")
    timing.add_argument("--threads", type=int, help="torch.set_num_threads and ONNX Runtime intra-op threads")
    timing.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds: every configuration is timed once per round (default 3)")
    timing.add_argument("--warmup", type=int, default=1,
                        help="untimed calls per configuration before the rounds (default 1, at least 1)")
    timing.add_argument("--no-keep-runners", dest="keep_runners", action="store_false",
                        help="open each backend's runner again in every round instead of keeping it (less memory: "
                             "for models whose engines do not fit in memory together)")
    timing.add_argument("--compile-freezing", choices=("on", "off"),
                        help="torch_compile rows: inductor weight freezing (default: the backend's, on for CPU). off "
                             "keeps no frozen copy of the weights beside the pipeline's (memory), at some speed on CPU")
    timing.add_argument("--out", help="output directory (default benchmarks/results/<date>-<model>/)")
    timing.add_argument("--engine-dir", help="keep engine builds here and reuse matching ones (default: a "
                                             "temporary directory, removed at the end)")
    timing.add_argument("--no-progress", action="store_true", help="no progress bar")
    timing.add_argument("--quiet", action="store_true", help="print nothing at the end (files are still written)")

    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true",
                       help="try intervals x branches x schedules and recommend the fastest within the bound")
    sweep.add_argument("--max-rel-l2", type=float, help="bound: latent relative L2 vs no cache")
    sweep.add_argument("--min-psnr", type=float, help="bound: PSNR (dB) of the decoded image vs no cache")


def run(args) -> list[dict]:
    """Run the benchmark `args` describe; write results.jsonl/.md/.png (and recommendation.json) and print a
    summary unless args.quiet. Returns the records, then (sweep) the recommendations (kind 'recommendation')."""
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        bench = Bench(args)
        records = bench.run()
    finally:
        torch.set_num_threads(threads_before)
    if not getattr(args, "quiet", False):
        _print_summary(bench, records)
    return records


def _print_summary(bench: Bench, records: list[dict]) -> None:
    header = bench.header()
    print(f"\ndcaccel bench: {header['model']}")
    print(f"machine: {header['machine']}\nsettings: {header['settings']}")
    for n in bench.steps:
        print(f"\n{n} steps\n" + markdown_table(records, n))
    for rec in (r for r in records if r["kind"] == "recommendation"):
        print(f"\nrecommended for {rec['backend']}, {rec['steps']} steps ({_bound_text(rec['bound'])}): "
              f"{rec['recommendation']}")
    print(f"\n{bench.plot_note}")
    print(f"results: {bench.out_dir}/results.jsonl, results.md" + (", recommendation.json" if bench.args.sweep else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcaccel bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        run(args)
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
