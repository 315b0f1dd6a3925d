#!/usr/bin/env bash
# fourierft against Hugging Face PEFT on this machine, both sides run alternately in one
# invocation, RUNS times each (default 3); every line is reported as median [min – max] over the
# runs, with the ratio PEFT ÷ fourierft (higher is better for fourierft) and the spread max ÷ min
# of each side's per-run values (a line whose spread is large is noise, not a result).
#
#   scripts/bench_side_by_side.sh [DIMS...]   one layer: examples/bench_layer.rs against
#                                             scripts/peft_layer_bench.py (default dims 384 1024 4096,
#                                             token counts $BATCHES, default "64 1024")
#   scripts/bench_side_by_side.sh --demo      the sentiment demo's training step: demo/src/bin/sentiment
#                                             against scripts/peft_sentiment.py on identical batches
#                                             (checked with --dump-batches), FourierFT and LoRA
#   scripts/bench_side_by_side.sh --llama     one training step of a stock candle-transformers Llama
#                                             (hidden 1024, 8 layers, 512 tokens, q/v n=1000):
#                                             examples/finetune_llama.rs --bench against
#                                             scripts/peft_llama_bench.py; train_step_ms, peak_rss_mb
#
#   env: RUNS (3), N (1000), BATCHES ("64 1024"), THREADS (2),
#        DEVICE (cpu; cuda needs FEATURES=cuda and torch with CUDA), DTYPE (f32; bf16, f16),
#        PYTHON (.venv/bin/python with torch, transformers and peft),
#        demo only: TRAIN (320 snippets = 10 steps), TEST (200), SEEDS (0), METHODS (fourierft,lora)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-3} N=${N:-1000} THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu} DTYPE=${DTYPE:-f32} FEATURES=${FEATURES:-}
BATCHES=${BATCHES:-"64 1024"}
[ "$RUNS" -ge 3 ] || { echo "RUNS must be at least 3" >&2; exit 1; }
"$PY" -c "import peft, torch" || { echo "needs $PY with torch and peft" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

machine() {
    local model cores caches
    model=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
    cores=$(nproc)
    caches=$(for c in /sys/devices/system/cpu/cpu0/cache/index*; do
        [ -r "$c/size" ] && echo -n "L$(cat "$c/level")$(cat "$c/type" | cut -c1 | tr 'DIU' 'diu') $(cat "$c/size"), "
    done)
    echo "machine: $model, $cores cores (nproc), caches as reported by sysfs: ${caches%, }"
    echo "flags: $(grep -m1 -o -w -E 'avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then
        echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
    fi
}

# Summarises "side run line value" records (stdin) as a markdown table.
summarise() {
    python3 -c '
import sys, statistics as st
rows = [l.split() for l in sys.stdin if l.strip()]
vals = {}
for side, run, line, v in rows:
    vals.setdefault(line, {}).setdefault(side, {})[int(run)] = float(v)
def fmt(xs):
    return f"{st.median(xs):.3f} [{min(xs):.3f} – {max(xs):.3f}]"
print("| line | PEFT median [min – max] | fourierft median [min – max] | PEFT ÷ fourierft: median-based [per-run min – max] | spread max÷min PEFT / ours |")
print("|---|---:|---:|---:|---:|")
for line, sides in vals.items():
    p, o = sides.get("peft", {}), sides.get("ours", {})
    if not p or not o:
        continue
    runs = sorted(set(p) & set(o))
    ratios = [p[r] / o[r] for r in runs if o[r] > 0]
    pv, ov = list(p.values()), list(o.values())
    spread = lambda xs: max(xs) / min(xs) if min(xs) > 0 else float("nan")
    print(f"| {line} | {fmt(pv)} | {fmt(ov)} | {st.median(pv) / st.median(ov):.2f}× "
          f"[{min(ratios):.2f} – {max(ratios):.2f}] | {spread(pv):.2f} / {spread(ov):.2f} |")
'
}

if [ "${1:-}" = "--demo" ]; then
    TRAIN=${TRAIN:-320} TEST=${TEST:-200} SEEDS=${SEEDS:-0} METHODS=${METHODS:-fourierft,lora}
    bash scripts/fetch-demo-assets.sh >/dev/null
    cargo build --release -p fourierft-demo --bin sentiment -q
    flags=(--methods "$METHODS" --seeds "$SEEDS" --train "$TRAIN" --test "$TEST")
    cmp -s <(target/release/sentiment "${flags[@]}" --dump-batches) \
        <("$PY" scripts/peft_sentiment.py "${flags[@]}" --dump-batches) ||
        { echo "the two sides would train on different batches" >&2; exit 1; }
    machine
    echo "job: ${flags[*]}, $THREADS threads each side, $RUNS runs per side, alternating"
    for r in $(seq 1 "$RUNS"); do
        ours() { RAYON_NUM_THREADS=$THREADS target/release/sentiment "${flags[@]}" \
            --no-merge-check --json "$out/ours$r.json" >/dev/null; }
        peft() { "$PY" scripts/peft_sentiment.py "${flags[@]}" --threads "$THREADS" \
            --json "$out/peft$r.json" >/dev/null; }
        if [ $((r % 2)) -eq 1 ]; then ours; peft; else peft; ours; fi
        echo "run $r done (load $(cut -d' ' -f1 /proc/loadavg))"
    done
    echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    python3 - "$out" "$RUNS" <<'EOF'
import json, statistics as st, sys
d, runs = sys.argv[1], int(sys.argv[2])
step = {}  # (side, method, key) -> [per run]
for side in ("ours", "peft"):
    for r in range(1, runs + 1):
        for res in json.load(open(f"{d}/{side}{r}.json")):
            m = res["method"].split()[0].lower()
            for k in ("step_ms", "step_cpu_ms", "accuracy"):
                step.setdefault((side, m, k), []).append(res[k])
fmt = lambda xs: f"{st.median(xs):.0f} [{min(xs):.0f} – {max(xs):.0f}]"
print("| method | side | step ms median [min – max] | step CPU ms median [min – max] | spread max÷min | accuracy % |")
print("|---|---|---:|---:|---:|---:|")
methods = sorted({m for (_, m, _) in step})
for m in methods:
    for side in ("ours", "peft"):
        xs = step.get((side, m, "step_ms"))
        if xs:
            acc = sorted(set(f"{a:.2f}" for a in step[(side, m, "accuracy")]))
            print(f"| {m} | {'fourierft' if side == 'ours' else 'PEFT'} | {fmt(xs)} | "
                  f"{fmt(step[(side, m, 'step_cpu_ms')])} | {max(xs) / min(xs):.2f} | {' / '.join(acc)} |")
print()
def ratio(a, b, what):
    if a in step and b in step:
        per = [x / y for x, y in zip(step[a], step[b])]
        print(f"{what}: {st.median(step[a]) / st.median(step[b]):.2f} (median ÷ median; "
              f"per run {min(per):.2f} – {max(per):.2f})")
ratio(("ours", "fourierft", "step_ms"), ("peft", "fourierft", "step_ms"),
      "our FourierFT step ÷ PEFT's FourierFT step (target ≤ 0.9)")
ratio(("ours", "fourierft", "step_ms"), ("ours", "lora", "step_ms"),
      "our FourierFT step ÷ our LoRA step (target ≤ 1)")
ratio(("ours", "fourierft", "step_cpu_ms"), ("peft", "fourierft", "step_cpu_ms"),
      "our FourierFT step CPU ÷ PEFT's FourierFT step CPU")
EOF
    exit 0
fi

if [ "${1:-}" = "--llama" ]; then
    cargo build --release --example finetune_llama -q
    machine
    echo "job: one training step (median of 3 after a warm-up), $THREADS threads each side, $RUNS runs per side, alternating"
    : >"$out/records"
    for r in $(seq 1 "$RUNS"); do
        ours() { RAYON_NUM_THREADS=$THREADS target/release/examples/finetune_llama --bench --bench-steps 3 |
            grep -E "^(train_step_ms|forward_ms|backward_ms|peak_rss_mb) " | sed "s/^/ours $r /" >>"$out/records"; }
        peft() { "$PY" scripts/peft_llama_bench.py --steps 3 --threads "$THREADS" 2>/dev/null |
            grep -E "^(train_step_ms|forward_ms|backward_ms|peak_rss_mb) " | sed "s/^/peft $r /" >>"$out/records"; }
        if [ $((r % 2)) -eq 1 ]; then ours; peft; else peft; ours; fi
        echo "run $r done (load $(cut -d' ' -f1 /proc/loadavg))"
    done
    echo
    summarise <"$out/records"
    echo
    echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    exit 0
fi

dims=("$@"); [ ${#dims[@]} -gt 0 ] || dims=(384 1024 4096)
cargo build --release ${FEATURES:+--features "$FEATURES"} --example bench_layer -q
machine
for d in "${dims[@]}"; do
    for b in $BATCHES; do
        flags=(--dim "$d" --n "$N" --batch "$b" --threads "$THREADS" --device "$DEVICE" --dtype "$DTYPE")
        : >"$out/records"
        for r in $(seq 1 "$RUNS"); do
            ours() { target/release/examples/bench_layer "${flags[@]}" | sed "s/^/ours $r /" >>"$out/records"; }
            peft() { "$PY" scripts/peft_layer_bench.py "${flags[@]}" | sed "s/^/peft $r /" >>"$out/records"; }
            # Alternate which side goes first, so that a drift in machine speed hits both.
            if [ $((r % 2)) -eq 1 ]; then ours; peft; else peft; ours; fi
        done
        echo
        echo "### d=$d, n=$N, $b tokens, $DEVICE $DTYPE, threads=$THREADS, $RUNS runs per side (load now $(cut -d' ' -f1 /proc/loadavg))"
        echo
        summarise <"$out/records"
        python3 -c '
import sys, statistics as st
f, b = {}, {}
for l in open(sys.argv[1]):
    side, run, line, v = l.split()
    if side == "ours" and line in ("forward_ms", "base_only_forward_ms"):
        (f if line == "forward_ms" else b)[run] = float(v)
x = [f[r] / b[r] for r in f if b.get(r)]
print(f"\nfourierft unmerged forward ÷ its base-only forward (median over runs): {st.median(x):.2f}×")
' "$out/records"
    done
done
echo
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
