#!/usr/bin/env bash
# Runs examples/bench_layer.rs and scripts/peft_layer_bench.py back to back for each size and
# prints one table per size with the ratio PEFT ÷ fourierft (higher is better for us).
#   scripts/bench_side_by_side.sh [DIMS...]   (default: 384 1024 4096; needs .venv with peft)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
N=${N:-1000} BATCH=${BATCH:-64} THREADS=${THREADS:-2}
dims=("$@"); [ ${#dims[@]} -gt 0 ] || dims=(384 1024 4096)
cargo build --release --example bench_layer -q
for d in "${dims[@]}"; do
    ours=$(target/release/examples/bench_layer --dim "$d" --n "$N" --batch "$BATCH" --threads "$THREADS")
    peft=$("$PY" scripts/peft_layer_bench.py --dim "$d" --n "$N" --batch "$BATCH" --threads "$THREADS")
    echo "## d=$d n=$N batch=$BATCH threads=$THREADS"
    echo "| line | PEFT | fourierft | PEFT ÷ fourierft |"
    echo "|---|---:|---:|---:|"
    paste <(echo "$peft") <(echo "$ours") | awk '{ printf "| %s | %s | %s | %.2f× |\n", $1, $2, $4, ($4 > 0 ? $2 / $4 : 0) }'
done
