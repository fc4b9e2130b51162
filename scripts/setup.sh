#!/usr/bin/env bash
# Set up a virtual environment in .venv with dcaccel and everything its CPU paths and tests need.
# torch is installed first and pinned to 2.13.0: here that is the CPU build on disk, where a plain `torch`
# requirement could pull a multi-GB CUDA build. On a GPU machine install your CUDA torch 2.13 first and add
# the gpu extra: .venv/bin/pip install -e ".[onnx,gpu]"
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev,onnx,lora,bench,serve]"
echo "dcaccel set up in $(pwd)/.venv"
