#!/usr/bin/env bash
# Checks that the crate compiles with `--features cuda` on a machine without a GPU or a CUDA
# install: the CUDA compiler and headers come from NVIDIA's PyPI wheels (pinned below) in a venv
# under target/, and candle's kernels are compiled to PTX for compute capability
# $CUDA_COMPUTE_CAP (default 90) without querying a device.
#
#   scripts/check-cuda-build.sh          cargo check --features cuda,cli --all-targets
#                                        (library, tests, examples, benches; extra args are passed on)
#
# A full `cargo build` would also link; the library loads libcuda at run time (cudarc's dynamic
# loading), so `check` is what can be verified here. It runs separately from .ci/run because it
# builds candle and its CUDA kernels a second time (library: ~15 min on an idle 2-core machine;
# all targets: ~50 min there under load; docs/DEVICES.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/cuda-venv
if [ ! -x "$VENV/bin/pip" ]; then
    python3 -m venv "$VENV"
fi
# One CUDA release (13.2) throughout: nvcc's front end (nvvm, crt) must match its ptxas.
"$VENV/bin/pip" install -q \
    "nvidia-cuda-nvcc==13.2.78" "nvidia-nvvm==13.2.78" "nvidia-cuda-crt==13.2.78" \
    "nvidia-cuda-runtime==13.2.75" "nvidia-cuda-cccl==13.2.86"
CUDA=$(cd "$VENV"/lib/python3*/site-packages/nvidia/cu13 && pwd)
export PATH="$CUDA/bin:$PATH" CUDA_ROOT="$CUDA" CUDA_PATH="$CUDA" CUDA_HOME="$CUDA"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
nvcc --version | tail -1
CARGO_TARGET_DIR=target/cuda-check cargo check --features cuda,cli --all-targets "$@"
echo "cuda build check: OK"
