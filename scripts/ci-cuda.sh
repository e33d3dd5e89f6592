#!/usr/bin/env bash
# Checks that the `cuda` feature compiles, with a CUDA 13.0 toolkit assembled from PyPI wheels
# (no GPU needed): the workspace, and the GPU tests (stages/model/tests/it/cuda.rs, which run on a
# GPU through scripts/gpu-check.sh).
#
#   scripts/ci-cuda.sh
#
# Not part of .ci/run: candle-kernels' build script compiles its quantized-matmul (MMQ) and MoE
# kernels with nvcc and ptxas, which took over 20 minutes on this project's 2-core machine
# (measured 2026-11-27), past CI's 45-minute budget on its own. Run it before changing anything
# under `cfg(feature = "cuda")`, and on any machine with more cores.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
eval "$(scripts/cuda-env.sh)"
CARGO_TARGET_DIR="$root/target/cuda" cargo check --workspace --features cuda --quiet
CARGO_TARGET_DIR="$root/target/cuda" cargo check -p emflow-model --features cuda --tests --quiet
echo "ci-cuda: the cuda feature and the GPU tests compile"
