#!/usr/bin/env bash
# Runs examples/bench_layer.rs and scripts/peft_layer_bench.py (real PEFT) alternately, twice
# each, for each size, and prints one table per size: the best (lowest) value of each line per
# side and the ratio PEFT ÷ fourierft (higher is better for fourierft).
#   scripts/bench_side_by_side.sh [DIMS...]   (default: 384 1024 4096)
#   env: N (1000), BATCH (64), THREADS (2), PYTHON (.venv/bin/python with torch + peft)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
N=${N:-1000} BATCH=${BATCH:-64} THREADS=${THREADS:-2}
dims=("$@"); [ ${#dims[@]} -gt 0 ] || dims=(384 1024 4096)
"$PY" -c "import peft, torch" || { echo "needs $PY with torch and peft (see scripts/peft_layer_bench.py)" >&2; exit 1; }
cargo build --release --example bench_layer -q
flags=(--dim 0 --n "$N" --batch "$BATCH" --threads "$THREADS")
best() { sort -k1,1 -k2,2g | awk '!seen[$1]++'; }
for d in "${dims[@]}"; do
    flags[1]=$d
    ours="" peft=""
    for _ in 1 2; do
        ours+=$(target/release/examples/bench_layer "${flags[@]}")$'\n'
        peft+=$("$PY" scripts/peft_layer_bench.py "${flags[@]}")$'\n'
    done
    echo "### d=$d, n=$N, batch=$BATCH, threads=$THREADS"
    echo
    echo "| line | PEFT | fourierft | PEFT ÷ fourierft |"
    echo "|---|---:|---:|---:|"
    join <(echo -n "$peft" | best | sort -k1,1) <(echo -n "$ours" | best | sort -k1,1) |
        awk '{ printf "| %s | %s | %s | %.1f× |\n", $1, $2, $3, ($3 > 0 ? $2 / $3 : 0) }'
    echo
    echo -n "$ours" | best | awk '$1=="forward_ms"{f=$2} $1=="base_only_forward_ms"{b=$2}
        END { printf "fourierft unmerged forward ÷ its base-only forward: %.2f×\n\n", f / b }'
done
