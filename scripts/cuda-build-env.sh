#!/usr/bin/env bash
# Prepare a machine WITHOUT a CUDA toolkit or GPU driver to compile and link `--features cuda` builds
# (candle's CUDA backend links cuBLAS/cuRAND/NVRTC/cudart/libcuda dynamically; its kernels need nvcc).
# Installs nvcc 13.0 and the link-time libraries from PyPI wheels, builds a link-only libcuda stub,
# and prints the environment to export.  Usage:  eval "$(scripts/cuda-build-env.sh)"
# nvcc is pinned to 13.0 on purpose: PTX from a newer nvcc cannot be loaded by a 13.0-era driver.
# The binary built this way runs on a real GPU machine with that machine's own libraries
# (LD_LIBRARY_PATH pointing at its CUDA 13 libs); the stub is never used at run time.
set -euo pipefail
PREFIX=${CUDA_BUILD_PREFIX:-/opt/cuda-build}
NV=$PREFIX/nvidia/cu13
if [[ ! -x $NV/bin/nvcc ]]; then
  # one pip call: a second --target install into the same prefix skips folders that already exist
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$PREFIX" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
    "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==13.0.*" >&2
fi
cd "$NV/lib"
for l in cublas cublasLt nvrtc cudart; do [[ -e lib$l.so ]] || ln -s lib$l.so.13 lib$l.so; done
[[ -e libcurand.so ]] || ln -s libcurand.so.10 libcurand.so
[[ -e ../lib64 ]] || ln -s lib ../lib64
STUB=$PREFIX/stub
if [[ ! -e $STUB/libcuda.so ]]; then
  mkdir -p "$STUB"
  # every driver entry point cudarc declares, as a symbol that only satisfies the linker
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null | tail -n 1)
  if [[ -z $src ]]; then echo "cuda-build-env: fetch the crate sources first (cargo fetch)" >&2; exit 1; fi
  grep -o "fn cu[A-Za-z0-9_]*" "$src" | sort -u | sed 's/fn \(.*\)/int \1(void){return 999;}/' > "$STUB/stub.c"
  gcc -shared -fPIC -o "$STUB/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$STUB/stub.c"
  ln -sf libcuda.so.1 "$STUB/libcuda.so"
fi
cat <<ENV
export CUDA_ROOT=$NV CUDA_PATH=$NV CUDA_HOME=$NV CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export PATH=$NV/bin:\$PATH
export RUSTFLAGS="\${RUSTFLAGS:-} -L $STUB -L $NV/lib"
ENV
