#!/usr/bin/env bash
# dcaccel calibrate end to end on real architectures with random weights (their images are noise: this shows
# that it runs and what it costs on these 2 cores, not a schedule worth using). Small on purpose, 128 px:
# SD 1.5 with 6 steps and 2 prompts, SD 3.5 Medium (2.2 B parameters, fp32) with 4 steps and 1 prompt.
# Run from the repository root; each writes <model>.log, <model>.time (GNU time: peak RSS) and the calibration.
set -euo pipefail
d=benchmarks/results/2026-12-07-calibration-architectures
run() {  # model steps prompts-file
    /usr/bin/time -v .venv/bin/dcaccel calibrate --model "$1" --height 128 --width 128 --steps "$2" --guidance 7 \
        --prompts "$3" --threads 2 --out "$d/$1-calibration.json" > "$d/$1.log" 2> "$d/$1.time"
}
run sd15 6 "$d/prompts.txt"
run sd35m 4 "$d/prompt-1.txt"
