"""What SD 3.5's skip-layer guidance costs with and without DeepCache, measured per evaluation on the SD 3.5
Medium architecture (random weights) and composed into the loop of a whole call.

Skip-layer guidance adds, on the steps i with start * N < i < stop * N, one evaluation of the text half of the
batch with some blocks left out. dcaccel runs it in full, outside the DeepCache schedule (README: Diffusers
features). So a call costs
    full steps x t(full, batch 2) + shallow steps x t(shallow, batch 2) + SLG steps x t(skip-layer, batch 1)
and this script measures the three times side by side (interleaved, medians of --repeats) on the eager graphs
at --size px, then composes them for the settings Stability recommends for SD 3.5 Medium (40 steps, layers
7, 8, 9, start 0.01, stop 0.2) and for 20 steps. It also checks that the skip-layer graph equals the
transformer's own `skip_layers=` forward on the same inputs.

    python benchmarks/slg_cost.py --out benchmarks/results/$(date +%F)-slg-cost
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="sd35m")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", default="7,8,9")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dcaccel.families.mmdit import DEFAULT_HEAD, DEFAULT_INTERVAL, DEFAULT_TAIL, SkipLayerMMDiT, split_transformer
    from dcaccel.models import build_pipeline
    from dcaccel.schedule import full_steps
    from dcaccel.config import DeepCacheConfig

    skip = tuple(int(i) for i in args.skip.split(","))
    pipe = build_pipeline(args.arch, seed=0)
    transformer = pipe.transformer.eval()
    full, shallow = split_transformer(transformer, DEFAULT_HEAD, DEFAULT_TAIL)
    slg = SkipLayerMMDiT(transformer, skip)
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    latent = args.size // int(pipe.vae_scale_factor)
    text_len = int(pipe.tokenizer_max_length) + 256

    def inputs(batch):
        return {"hidden_states": torch.randn(batch, cfg.in_channels, latent, latent, generator=g),
                "timestep": torch.full((batch,), 700.0),
                "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g)}

    two, one = inputs(2), inputs(1)
    with torch.no_grad():
        _, feature = full(**two)
        check = slg(**one)
        own = transformer(**one, skip_layers=list(skip), return_dict=False)[0]
    exact = bool(torch.equal(check, own))
    runs = {"full": lambda: full(**two), "shallow": lambda: shallow(**two, feature=feature), "skip_layers": lambda: slg(**one)}
    times = {name: [] for name in runs}
    with torch.no_grad():
        for name, run in runs.items():  # warm-up
            run()
        for _ in range(args.repeats):  # interleaved rounds
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    t = {name: statistics.median(v) for name, v in times.items()}

    def loop(n, deepcache: bool, slg_on: bool, start=0.01, stop=0.2):
        fulls = full_steps(DeepCacheConfig(interval=DEFAULT_INTERVAL), n) if deepcache else list(range(n))
        slg_steps = [i for i in range(n) if start * n < i < stop * n] if slg_on else []
        return len(fulls) * t["full"] + (n - len(fulls)) * t["shallow"] + len(slg_steps) * t["skip_layers"], slg_steps

    rows = []
    for n in (40, 20):
        for deepcache in (False, True):
            base, _ = loop(n, deepcache, False)
            with_slg, slg_steps = loop(n, deepcache, True)
            rows.append({"steps": n, "deepcache": deepcache, "loop_s": base, "loop_slg_s": with_slg,
                         "slg_steps": slg_steps, "slg_share": (with_slg - base) / with_slg})
    machine = f"{platform.node()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    result = {"date": datetime.now(timezone.utc).isoformat(), "machine": machine, "arch": args.arch,
              "size": args.size, "skip_layers": skip, "blocks": len(transformer.transformer_blocks),
              "cut": {"interval": DEFAULT_INTERVAL, "head_blocks": DEFAULT_HEAD, "tail_blocks": DEFAULT_TAIL},
              "seconds": times, "median_s": t, "skip_graph_equals_skip_layers_forward": exact, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Skip-layer guidance's cost ({result['date'][:10]}, {machine})", "",
             f"{args.arch} architecture (random weights, {result['blocks']} blocks), {args.size} px, fp32 eager graphs, "
             f"medians of {args.repeats} interleaved repeats: full graph (batch 2, CFG) {t['full']:.2f} s, shallow "
             f"graph (batch 2; DeepCache default: interval {DEFAULT_INTERVAL}, head {DEFAULT_HEAD}, tail "
             f"{DEFAULT_TAIL}) {t['shallow']:.2f} s, skip-layer graph (batch 1, blocks {list(skip)} left out) "
             f"{t['skip_layers']:.2f} s. The skip-layer graph equals the transformer's own skip_layers forward: "
             f"{exact}.", "",
             "Composed into a call (start 0.01, stop 0.2, as Stability recommends for SD 3.5 Medium):", "",
             "| steps | DeepCache | SLG steps | loop s without SLG | with SLG | SLG's share of the loop |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {'default' if r['deepcache'] else 'off'} | {len(r['slg_steps'])} | "
                     f"{r['loop_s']:.1f} | {r['loop_slg_s']:.1f} | {100 * r['slg_share']:.0f}% |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
