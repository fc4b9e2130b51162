"""Images/s of `dcaccel serve` on one Ray node vs two, with the same total CPUs, deployed as README's cluster
procedure does it (engines from `dcaccel build` with the shipped calibration, `dcaccel serve --emit-config`,
`serve deploy`) on loopback addresses (dcaccel.serve.cluster).

    one node : head with 2 CPUs, 2 generator replicas (1 CPU, 1 thread each), the ingress and proxy
    two nodes: head with 1 CPU (1 replica, the ingress and proxy) + a worker with 1 CPU (1 replica)

Both run on this one machine, so the two-node cluster has no more cores than the one-node one: what this can
show is what spreading replicas over nodes costs (the requests to the worker's replica cross between nodes,
the worker runs its own raylet and agents), not how throughput grows with machines. Rows alternate between the
two configurations (a fresh cluster each), several rounds; medians are reported.

    python benchmarks/serve_cluster.py --out benchmarks/results/$(date +%F)-serve-cluster
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import load  # noqa: E402

from dcaccel.bench.run import machine_info  # noqa: E402
from dcaccel.models import shipped_calibration  # noqa: E402
from dcaccel.serve.cluster import HEAD_IP, LoopbackCluster, free_port, ray_env  # noqa: E402

WORKER_IP = "127.0.0.3"
LAYOUTS = {"1 node x 2 CPUs": [(HEAD_IP, 2)], "2 nodes x 1 CPU": [(HEAD_IP, 1), (WORKER_IP, 1)]}


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dcaccel.cli", *args], check=True, env=ray_env(), timeout=600,
                   stdout=subprocess.DEVNULL)


def run_layout(name: str, engine_dir: Path, tmp: Path, args) -> dict:
    nodes = LAYOUTS[name]
    port = free_port()
    config = tmp / "serve.yaml"
    _cli("serve", "--model", "shapes", "--backend", "onnxruntime", "--engine-dir", str(engine_dir),
         "--replicas", "2", "--max-batch", str(args.max_batch), "--batch-wait-ms", "20", "--threads", "1",
         "--cpus-per-replica", "1", "--resources-per-replica", '{"dcaccel_slot": 1}',
         "--ingress-resources", '{"dcaccel_ingress": 1}', "--proxy-location", "HeadOnly", "--host", HEAD_IP,
         "--port", str(port), "--emit-config", str(config))
    start = time.perf_counter()
    with LoopbackCluster() as cluster:
        (head_ip, head_cpus), *workers = nodes
        cluster.start_head(cpus=head_cpus, resources={"dcaccel_slot": head_cpus, "dcaccel_ingress": 1})
        for ip, cpus in workers:
            cluster.add_worker(ip, cpus=cpus, resources={"dcaccel_slot": cpus})
        cluster.deploy(config)
        placement = [ip for ip, cpus in nodes for _ in range(cpus)]
        cluster.wait_for_replicas("dcaccel", "Generator", placement, timeout=300)
        ready_s = time.perf_counter() - start
        url = f"http://{HEAD_IP}:{port}"
        load(url + "/v1/generate", clients=2, per_client=2, seconds=60, steps=args.steps)  # warm-up
        result = load(url + "/v1/generate", clients=args.clients, per_client=args.requests_per_client,
                      seconds=args.seconds, steps=args.steps)
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
            schedule = json.load(r)["data"][0]["deepcache"]
    return {"layout": name, "replicas_on": placement, "ready_s": ready_s, "schedule": schedule, **result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=12)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=4)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engines = out / "engines.tmp"
    _cli("build", "--model", "shapes", "--backend", "onnxruntime", "--batch", str(args.max_batch),
         "--calibration", shipped_calibration("shapes"), "--out", str(engines))
    (engine_dir,) = [m.parent for m in engines.glob("shapes/*/manifest.json")]
    info = machine_info()
    machine = f"{info['cpu']}, {info['cores_usable']} of {info['cores']} cores usable"
    records = []
    with open(out / "results.jsonl", "w") as log:
        for r in range(args.rounds):
            for name in LAYOUTS:
                row = {"round": r, "date": datetime.now(timezone.utc).isoformat(), "machine": machine,
                       **run_layout(name, engine_dir, out, args)}
                print(f"round {r} {name}: {row['images_per_s']:.2f} images/s, p50 {row['p50_s']:.2f} s, "
                      f"{row['ok']} ok, {row['failed']} failed (ready in {row['ready_s']:.0f} s)", flush=True)
                log.write(json.dumps(row) + "\n")
                log.flush()
                records.append(row)
    shutil.rmtree(engines, ignore_errors=True)
    (out / "serve.yaml").unlink(missing_ok=True)
    write_report(records, out, args, machine)
    print((out / "results.md").read_text())
    return 0


def write_report(records: list[dict], out: Path, args, machine: str) -> None:
    med = {name: {k: statistics.median(r[k] for r in records if r["layout"] == name)
                  for k in ("images_per_s", "p50_s", "p99_s", "ready_s")} for name in LAYOUTS}
    one, two = (med[n]["images_per_s"] for n in LAYOUTS)
    lines = [f"# dcaccel serve on one Ray node vs two ({records[0]['date'][:10]})", "",
             f"- machine: {machine}; both clusters on this machine, loopback addresses (head {HEAD_IP}, worker "
             f"{WORKER_IP}); the same total CPUs (2) and 2 generator replicas of 1 CPU and 1 thread each",
             f"- shapes model, onnxruntime engines built with --batch {args.max_batch} and the shipped calibration "
             f"({records[0]['schedule'].get('num_full_steps')} full steps of {args.steps}); {args.clients} clients, "
             f"{args.requests_per_client} requests each (bounded by {args.seconds:g} s); {args.rounds} rounds, "
             "layouts alternating, a fresh cluster per row; medians", "",
             "| layout | images/s | p50 s | p99 s | ready s (nodes started, deployed, replicas loaded) | rows: images/s |",
             "|---|---|---|---|---|---|"]
    for name in LAYOUTS:
        rows = ", ".join(f"{r['images_per_s']:.2f}" for r in records if r["layout"] == name)
        m = med[name]
        lines.append(f"| {name} | {m['images_per_s']:.2f} | {m['p50_s']:.2f} | {m['p99_s']:.2f} | {m['ready_s']:.0f} "
                     f"| {rows} |")
    failed = sum(r["failed"] for r in records)
    lines += ["", f"Two nodes / one node: {two / one:.2f}x images/s. Requests failed: {failed} of "
                  f"{sum(r['sent'] for r in records)}.", "",
              "Same cores on one machine: this shows what spreading the replicas over two nodes costs here, not the "
              "gain of adding a machine (a second machine would add its cores; per-replica throughput is what the "
              "single-node rows measure)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
