#!/usr/bin/env bash
# The checks to run on a machine with an NVIDIA GPU: build with the `cuda` feature, run the test
# suite with the device-parameterised tests (tests/device.rs, tests/half_precision.rs) on the GPU,
# then time one layer against Hugging Face PEFT on the GPU at d = 1024 and 4096, f32 and bf16, and
# print the side-by-side tables (paste them into README.md, "Speed", with the machine line).
#
#   scripts/gpu-check.sh
#
# Needs: an NVIDIA driver (nvidia-smi), the CUDA compiler (nvcc on PATH, /usr/local/cuda, or the
# pinned PyPI wheels that scripts/check-cuda-build.sh installs under target/cuda-venv), a Rust
# toolchain with access to the crates registry (or a `cargo vendor` directory), and for the PEFT
# side a Python with torch built for CUDA and peft (PYTHON, default .venv/bin/python).
# env: PYTHON, CUDA_COMPUTE_CAP (default: from nvidia-smi), RUNS (3), SKIP_TESTS=1, SKIP_BENCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-.venv/bin/python}

command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi, so no NVIDIA GPU here" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
if ! command -v nvcc >/dev/null; then
    for dir in /usr/local/cuda/bin target/cuda-venv/lib/python3*/site-packages/nvidia/cu13/bin; do
        [ -x "$dir/nvcc" ] && export PATH="$(cd "$dir" && pwd):$PATH" && break
    done
fi
command -v nvcc >/dev/null || { echo "gpu-check: nvcc not found (see scripts/check-cuda-build.sh)" >&2; exit 1; }
nvcc --version | tail -1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$cap}

if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== test suite, device-parameterised tests on cuda (FOURIERFT_TEST_DEVICE=cuda)"
    FOURIERFT_TEST_DEVICE=cuda cargo test --features cuda,cli --all-targets
    FOURIERFT_TEST_DEVICE=cuda cargo test --features cuda,cli --test device --test half_precision \
        -- --nocapture 2>&1 | grep -E "^test |error|merged|Dense|Auto" || true
fi

if [ -z "${SKIP_BENCH:-}" ]; then
    if "$PYTHON" -c "import torch, peft; assert torch.cuda.is_available()" 2>/dev/null; then
        for dtype in f32 bf16; do
            echo "== one layer, fourierft vs PEFT on cuda, $dtype"
            DEVICE=cuda DTYPE=$dtype FEATURES=cuda RUNS=${RUNS:-3} BATCHES="64 1024" \
                bash scripts/bench_side_by_side.sh 1024 4096
        done
    else
        echo "== $PYTHON has no CUDA torch + peft: fourierft side only"
        cargo build --release --features cuda --example bench_layer -q
        for dtype in f32 bf16; do
            for d in 1024 4096; do
                for b in 64 1024; do
                    echo "-- d=$d, $b tokens, $dtype"
                    target/release/examples/bench_layer --device cuda --dtype "$dtype" --dim "$d" --batch "$b"
                done
            done
        done
    fi
fi
