#!/usr/bin/env bash
# Type-checks the CUDA build (`--features cuda`, every target) on a machine WITHOUT a GPU: nvcc and
# the CUDA headers come from pinned PyPI wheels (scripts/cuda_env.sh), candle's kernels are really
# compiled by nvcc (for CUDA_COMPUTE_CAP, default 90), and our code is checked with cfg(feature =
# "cuda") on. Nothing is linked and nothing runs, so no driver or libcuda is needed.
#
#   scripts/cuda_check.sh            # cargo check --features cuda --all-targets
#   scripts/cuda_check.sh --clippy   # the same through clippy, -D warnings
#   scripts/cuda_check.sh --build    # cargo build --features cuda --bin afa, profile
#                                    # $AFA_CUDA_PROFILE (default release); candle links
#                                    # libcuda, cuBLAS(Lt), cuRAND, NVRTC and cuDNN (cudarc's
#                                    # dynamic-linking), so where the toolkit lacks one a
#                                    # link-only stub stands in (scripts/cuda_env.sh)
#
# The venv and the target dir live OUTSIDE the clone ($AFA_CUDA_CACHE, default /var/cache/afa-cuda),
# so repeated CI runs on one machine are incremental. Measured on the 2-core CI machine shared
# with other jobs (load ~6): cold 26 min (~10 of them nvcc on candle's kernels), after a change
# to our code 20-30 s, nothing changed 0.3 s. Extra cargo flags may follow the mode.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cuda_env.sh
source scripts/cuda_env.sh

mode=check
case "${1:-}" in
  --clippy) mode=clippy; shift ;;
  --build) mode=build; shift ;;
  --check) shift ;;
esac

AFA_CUDA_FROM_WHEELS="${AFA_CUDA_FROM_WHEELS:-1}" afa_cuda_env
cache="$(afa_cuda_cache_dir)"
export CARGO_TARGET_DIR="${AFA_CUDA_TARGET_DIR:-$cache/target}"

if [ "$mode" = build ]; then
  afa_cudart_link_path
  afa_cuda_link_stubs
fi

start=$(date +%s)
case "$mode" in
  check) cargo check --features cuda --all-targets "$@" ;;
  clippy) cargo clippy --features cuda --all-targets "$@" -- -D warnings ;;
  build) cargo build --profile "${AFA_CUDA_PROFILE:-release}" --features cuda --bin afa "$@" ;;
esac
echo "cuda_check: cargo $mode --features cuda took $(($(date +%s) - start)) s (target dir $CARGO_TARGET_DIR)"
