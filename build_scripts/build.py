#!/usr/bin/env python3
"""Offline engine builds: the same as `dcaccel build` (run with --help for the options).

    python build_scripts/build.py --model sd15 --height 256 --width 256 --backend onnxruntime
    python build_scripts/build.py --model path/to/pipeline --backend tensorrt --fp16 --refittable

Writes engines/<model>/<key>/ (full and shallow graphs + manifest.json); a build with the same key is skipped
unless --force is given.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcaccel.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["build", *sys.argv[1:]])
