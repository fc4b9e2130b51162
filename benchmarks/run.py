"""Thin wrapper: `python benchmarks/run.py [options]` is `dcaccel bench [options]` (see benchmarks/README.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dcaccel.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
