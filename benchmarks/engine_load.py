"""What verifying an engine's files costs when a serving process loads it (issue 10).

Builds (or reuses) an onnxruntime engine of an embedded architecture, then opens it several times, alternating
with and without the sha256 check of its files, and reports the medians side by side, the bytes hashed and the
hashing throughput. The first open pays for reading the files from disk; later ones read the page cache, as a
server restarting on the same machine would.

    python benchmarks/engine_load.py --model sd15 --height 256 --width 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcaccel.config import BuildConfig, DeepCacheConfig  # noqa: E402
from dcaccel.engines import Manifest, build_engines, open_runner  # noqa: E402
from dcaccel.models import build_pipeline  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--out", default="engines")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    pipe = build_pipeline(args.model)
    start = time.perf_counter()
    directory, built = build_engines(pipe, BuildConfig(height=args.height, width=args.width, branch=0,
                                                       backend="onnxruntime"), out_dir=args.out, model_name=args.model)
    build_s = time.perf_counter() - start
    manifest = Manifest.read(directory)
    nbytes = sum(m["size"] for g in manifest.data["graphs"].values() for m in g["checksums"].values())
    times = {True: [], False: []}
    hash_s = []
    for _ in range(args.repeats):
        for verify in (True, False):
            t0 = time.perf_counter()
            runner, info = open_runner(pipe, DeepCacheConfig(branch=0), "onnxruntime", engine_dir=directory,
                                       verify_files=verify)
            times[verify].append(time.perf_counter() - t0)
            if verify:
                hash_s.append(info["hash_seconds"])
            runner.close()
            del runner
    result = {
        "model": args.model, "size": [args.height, args.width], "engine_dir": str(directory),
        "built_now": built, "build_or_check_s": round(build_s, 2), "engine_bytes": nbytes,
        "open_with_sha256_median_s": round(statistics.median(times[True]), 3),
        "open_without_sha256_median_s": round(statistics.median(times[False]), 3),
        "sha256_median_s": round(statistics.median(hash_s), 3),
        "sha256_gb_per_s": round(nbytes / 1e9 / statistics.median(hash_s), 2),
        "opens": {"with": [round(t, 3) for t in times[True]], "without": [round(t, 3) for t in times[False]]},
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}",
        "note": "the open includes hashing the U-Net's weights (for the key) and creating the ONNX Runtime sessions",
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
