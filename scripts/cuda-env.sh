#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit from PyPI wheels (no system toolkit, no GPU needed) and prints the
# environment that cudarc and candle-kernels need to build emflow's `cuda` feature.
#
#   eval "$(scripts/cuda-env.sh)"          # assemble once (about 660 MB download), export the env
#   cargo build --release --features cuda
#
# Why CUDA 13.0 and not newer: nvcc 13.5 writes PTX 9.5, which a 580-series driver (CUDA 13.0)
# cannot JIT, and cudarc 0.19.10 refuses toolkits above 13.4. The wheels lack two things a build
# needs, filled in here: unversioned library links (and lib64), and a libcuda.so stub to link
# against (the real one comes with the GPU driver at run time).
#
# Environment: EMFLOW_CUDA_HOME (default ~/.cache/emflow/cuda-13.0), CUDA_COMPUTE_CAP (default 90:
# H100/H200), PYTHON (default python3).
set -euo pipefail

home="${EMFLOW_CUDA_HOME:-$HOME/.cache/emflow/cuda-13.0}"
py="${PYTHON:-python3}"
cap="${CUDA_COMPUTE_CAP:-90}"
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.1.3 nvidia-curand==10.4.0.35
)
toolkit="$home/nvidia/cu13"

if [ ! -f "$home/.complete" ]; then
  echo "emflow: assembling a CUDA 13.0 toolkit from wheels into $home" >&2
  rm -rf "$home.partial"
  mkdir -p "$home.partial/wheels"
  "$py" -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --python-version 3.11 -d "$home.partial/wheels" "${wheels[@]}" >&2
  for w in "$home.partial"/wheels/*.whl; do
    "$py" -m zipfile -e "$w" "$home.partial" >&2
  done
  rm -rf "$home.partial/wheels"
  tk="$home.partial/nvidia/cu13"
  chmod +x "$tk"/bin/* "$tk"/nvvm/bin/* 2>/dev/null || true
  [ -e "$tk/lib64" ] || ln -s lib "$tk/lib64"
  # The wheels ship only versioned sonames; the linker looks for the plain names.
  for so in "$tk"/lib/lib*.so.*; do
    base="${so%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
  done
  # Link-time stub for the driver library: every cu* entry point of the driver API headers,
  # returning CUDA_ERROR_STUB_LIBRARY (34). Never on the run-time path: the driver's own
  # libcuda.so.1 is found first on a GPU machine.
  mkdir -p "$tk/lib/stubs"
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$tk"/include/cuda.h "$tk"/include/cudaGL.h \
      "$tk"/include/cudaEGL.h "$tk"/include/cudaVDPAU.h 2>/dev/null | sort -u |
    awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$tk/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/lib/stubs/libcuda.so" "$tk/lib/stubs/libcuda_stub.c"
  rm -rf "$home"
  mv "$home.partial" "$home"
  touch "$home/.complete"
  echo "emflow: CUDA toolkit ready at $toolkit" >&2
fi

cat <<ENV
export CUDA_HOME="$toolkit"
export CUDA_PATH="$toolkit"
export PATH="$toolkit/bin:$toolkit/nvvm/bin:\$PATH"
export LIBRARY_PATH="$toolkit/lib:$toolkit/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="$cap"
export CUDAFORGE_THREADS="\${CUDAFORGE_THREADS:-2}"
ENV
