"""Load on `dcaccel serve` over loopback: throughput (images/s) and latency p50/p95/p99 at several numbers of
concurrent clients, for batching on/off x DeepCache on/off x 1 or 2 replicas, in one run.

Every configuration is a fresh `dcaccel serve` process (the machine's CPUs split evenly between its replicas:
1 replica x 2 threads or 2 replicas x 1 thread on 2 cores). Per number of clients, each client sends requests
one after the other (each with its own seed) until --requests-per-client are done or --seconds run out; a
request is counted when it completes with 200, and every other status is counted as failed. Bounded in count
and time. Prints a table; writes results.jsonl, results.md and results.png to --out.

    python benchmarks/serve_load.py --out benchmarks/results/$(date +%F)-serve-load
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

PROMPTS = ["a large red circle at the top left", "a small blue square in the center",
           "a large green triangle at the bottom right", "a small yellow circle at the top right"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> tuple[int, float]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        code = -1
    return code, time.perf_counter() - start


class Server:
    def __init__(self, args, batching: bool, deepcache: bool, replicas: int):
        self.port = _port()
        cpus = max(1, (os.cpu_count() or 2) // replicas)
        cmd = [sys.executable, "-m", "dcaccel.cli", "serve", "--model", args.model, "--port", str(self.port),
               "--replicas", str(replicas), "--cpus-per-replica", str(cpus), "--threads", str(cpus),
               "--max-batch", str(args.max_batch if batching else 1),
               "--batch-wait-ms", str(args.batch_wait_ms if batching else 0), "--max-queued", "256",
               "--deadline-s", str(args.seconds * 4)]
        if not deepcache:
            cmd.append("--no-cache")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()
        deadline = time.time() + 300
        while not any(line.startswith("serving") for line in self.lines):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not start: " + "".join(self.lines[-20:]))
            time.sleep(0.5)
        self.url = f"http://127.0.0.1:{self.port}/v1/generate"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(url: str, clients: int, per_client: int, seconds: float, steps: int) -> dict:
    stop_at = time.perf_counter() + seconds
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def client(c: int):
        for i in range(per_client):
            if time.perf_counter() > stop_at:
                return
            code, latency = _post(url, {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "seed": c * 1000 + i,
                                        "steps": steps}, timeout=seconds * 4)
            with lock:
                results.append((code, latency))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    ok = sorted(lat for code, lat in results if code == 200)

    def pct(q):
        return ok[min(len(ok) - 1, int(round(q / 100 * (len(ok) - 1))))] if ok else None

    return {"clients": clients, "sent": len(results), "ok": len(ok), "failed": len(results) - len(ok),
            "failed_codes": sorted({code for code, _ in results if code != 200}), "wall_s": wall,
            "images_per_s": len(ok) / wall if wall else None, "p50_s": pct(50), "p95_s": pct(95), "p99_s": pct(99),
            "mean_s": statistics.mean(ok) if ok else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=6)
    p.add_argument("--seconds", type=float, default=90, help="time bound per (configuration, clients)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=50)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=f"benchmarks/results/{datetime.now():%Y-%m-%d}-serve-load")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    for replicas in args.replicas:
        for batching in (False, True):
            for deepcache in (False, True):
                label = (f"{replicas} replica{'s' if replicas > 1 else ''}, batching {'on' if batching else 'off'}, "
                         f"DeepCache {'on' if deepcache else 'off'}")
                print(f"{label}: starting", flush=True)
                server = Server(args, batching, deepcache, replicas)
                try:
                    load(server.url, 1, 2, args.seconds, args.steps)  # warm-up, not recorded
                    for clients in args.clients:
                        r = load(server.url, clients, args.requests_per_client, args.seconds, args.steps)
                        r.update(label=label, replicas=replicas, batching=batching, deepcache=deepcache,
                                 model=args.model, steps=args.steps, max_batch=args.max_batch if batching else 1,
                                 machine=machine, date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                        records.append(r)
                        f = (lambda v: "-" if v is None else f"{v:.2f}")
                        print(f"  {clients:>2} clients: {f(r['images_per_s'])} images/s, p50 {f(r['p50_s'])} s, "
                              f"p99 {f(r['p99_s'])} s, {r['failed']} failed {r['failed_codes'] or ''}", flush=True)
                        with open(out / "results.jsonl", "a") as f:
                            f.write(json.dumps(r) + "\n")
                finally:
                    server.stop()
    write_report(records, out, args, machine)
    return 0


def write_report(records, out: Path, args, machine: str) -> None:
    lines = [f"# dcaccel serve under load ({records[0]['date'][:10] if records else ''})", "",
             f"- machine: {machine}; loopback HTTP; model {args.model}, {args.steps} steps, default guidance and size",
             f"- {args.requests_per_client} requests per client (bounded by {args.seconds:g} s); batching on = "
             f"--max-batch {args.max_batch} --batch-wait-ms {args.batch_wait_ms:g}; CPUs split between replicas", "",
             "| configuration | clients | images/s | p50 s | p95 s | p99 s | ok | failed |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        f = (lambda v: "-" if v is None else f"{v:.2f}")
        lines.append(f"| {r['label']} | {r['clients']} | {f(r['images_per_s'])} | {f(r['p50_s'])} | {f(r['p95_s'])} | "
                     f"{f(r['p99_s'])} | {r['ok']} | {r['failed']} |")
    base = {(r["replicas"], r["clients"]): r for r in records if not r["batching"] and not r["deepcache"]}
    lines += ["", "Throughput over the same replicas without batching or DeepCache, at each number of clients:", ""]
    for r in records:
        b = base.get((r["replicas"], r["clients"]))
        if b and b["images_per_s"] and r["images_per_s"] and (r["batching"] or r["deepcache"]):
            lines.append(f"- {r['label']}, {r['clients']} clients: {r['images_per_s'] / b['images_per_s']:.2f}x")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label in dict.fromkeys(r["label"] for r in records):
        rows = [r for r in records if r["label"] == label]
        a1.plot([r["clients"] for r in rows], [r["images_per_s"] or 0 for r in rows], marker="o", label=label)
        a2.plot([r["clients"] for r in rows], [r["p99_s"] or 0 for r in rows], marker="o", label=label)
    for ax, name in ((a1, "images/s"), (a2, "p99 latency s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(name)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
