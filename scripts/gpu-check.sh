#!/usr/bin/env bash
# Prove emflow's CUDA path on a machine with an NVIDIA GPU and no Rust toolchain or network.
#
#   scripts/gpu-check.sh EMFLOW_CUDA_BINARY [CUDA_TEST_BINARY] [SMOLLM2.gguf]
#
# Build both binaries on a CPU machine with the toolkit from scripts/cuda-env.sh, then copy them:
#
#   eval "$(scripts/cuda-env.sh)"
#   CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
#   CARGO_TARGET_DIR=target/cuda cargo test --release -p emflow-model --features cuda \
#       --test it --no-run        # prints the test binary's path
#
# It runs the GPU tests (CPU parity within bf16 tolerance, LoRA gradients, determinism on one
# device) with EMFLOW_REQUIRE_GPU=1 so a missing GPU fails instead of skipping, then
# `emflow bench model` with random weights in the SmolLM2-135M and Qwen2.5-0.5B shapes, and
# `emflow bench rl` when a SmolLM2 GGUF is given, printing tokens/s and the peak GPU memory
# nvidia-smi saw during each benchmark. Exit status: non-zero if any part failed.
set -uo pipefail

if [ $# -lt 1 ] || [ ! -x "$1" ]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
emflow=$1
tests=${2:-}
gguf=${3:-}
status=0

command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: is this a GPU machine?"; exit 2; }
echo "== GPU"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader

# Runs "$@" while sampling GPU memory every 0.2 s; prints the peak.
with_peak_memory() {
  local log
  log=$(mktemp)
  (while true; do
     nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 >>"$log" 2>/dev/null
     sleep 0.2
   done) &
  local sampler=$!
  "$@"
  local rc=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  echo "peak GPU memory (nvidia-smi): $(sort -n "$log" | tail -1) MiB"
  rm -f "$log"
  return $rc
}

if [ -n "$tests" ]; then
  echo "== GPU tests"
  # The one test binary holds every model test; the GPU ones are its `cuda::` module.
  EMFLOW_REQUIRE_GPU=1 "$tests" cuda:: --test-threads=1 || status=1
else
  echo "== GPU tests: skipped (no test binary given)"
fi

for shape in smollm2-135m qwen2.5-0.5b; do
  echo "== bench model: $shape (random weights), CUDA 0"
  with_peak_memory "$emflow" bench model --random "$shape" --cuda 0 || status=1
done

if [ -n "$gguf" ]; then
  echo "== bench rl: SmolLM2 on CUDA 0"
  with_peak_memory "$emflow" bench rl "$gguf" 3 --cuda 0 || status=1
else
  echo "== bench rl: skipped (no SmolLM2 GGUF given)"
fi

[ $status -eq 0 ] && echo "gpu-check: all passed" || echo "gpu-check: FAILED (see above)"
exit $status
