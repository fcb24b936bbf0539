#!/usr/bin/env bash
# Checks the `flash-attn` feature (FlashAttention-2 on sm80+ GPUs, candle-flash-attn) on a
# machine WITHOUT a GPU, through clippy with -D warnings, the CUDA toolkit from PyPI wheels as in
# scripts/cuda_check.sh.
#
#   scripts/flash_attn_check.sh --api-only # our code against candle-flash-attn's Rust API, its
#                                          # kernels NOT compiled (below); a minute, in CI
#   scripts/flash_attn_check.sh            # the real thing: nvcc compiles its 53 kernels
#   scripts/flash_attn_check.sh --build    # cargo build (release) --features flash-attn --bin afa
#
# The real check needs a CUTLASS checkout, prepared offline (scripts/cuda_env.sh,
# afa_cutlass_checkout; AFA_CUTLASS_GIT names where the commit comes from when GitHub cannot
# be reached), and is long: one kernel (head size 64, f16) took 4.3 CPU-minutes here, the 53 of
# them some 3-4 hours on 2 cores, so it is opt-in (on a 16-core machine, a few tens of minutes).
# The kernels are kept outside the clone (CANDLE_FLASH_ATTN_BUILD_DIR) with a target dir of
# their own, so a second run only checks our code.
#
# --api-only type-checks everything our code asks of the crate (its functions, their types, the
# cfg(feature = "flash-attn") code of every target) without nvcc on the kernels: a copy of the
# crate's source from cargo's registry, with its build script (the kernels' compile) replaced by
# an empty one, patched in for this one command. Nothing is linked, so the missing kernel library
# is never looked for. Cargo.lock is restored afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh

mode=clippy
case "${1:-}" in
  --api-only) mode=api-only; shift ;;
  --build) mode=build; shift ;;
esac

if [ "$mode" = api-only ]; then
  src="$(afa_crate_src candle-flash-attn)"
  copy="$(afa_cuda_cache_dir)/$(basename "$src")-api-only"
  rm -rf "$copy"
  cp -r "$src" "$copy"
  echo '// The kernels are not compiled: scripts/flash_attn_check.sh --api-only.' >"$copy/build.rs"
  echo 'fn main() {}' >>"$copy/build.rs"
  cp Cargo.lock "$copy/Cargo.lock.ours"
  trap 'cp "$copy/Cargo.lock.ours" Cargo.lock' EXIT
  # CI's CUDA target dir: everything but this crate and ours is already built there.
  scripts/cuda_check.sh --clippy --features flash-attn \
    --config "patch.crates-io.candle-flash-attn.path='$copy'" "$@"
  exit 0
fi

afa_cutlass_checkout
# cudaforge runs half the cores' worth of nvcc at once unless told; CUDAFORGE_THREADS wins.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
# A target dir of its own: sharing CI's (scripts/cuda_check.sh), each of the two rebuilt
# candle's CUDA kernels (~10 min of nvcc) after the other ran.
export AFA_CUDA_TARGET_DIR="${AFA_CUDA_TARGET_DIR:-$(afa_cuda_cache_dir)/target-flash-attn}"
case "$mode" in
  build) exec scripts/cuda_check.sh --build --features flash-attn "$@" ;;
  *) exec scripts/cuda_check.sh --clippy --features flash-attn "$@" ;;
esac
