#!/usr/bin/env bash
# The GPU check (issue 12), one run of at most ~10 minutes on a GPU machine (an H200 in mind):
#   1. build `afa` and the parity tests with --features cuda (release),
#   2. the parity tests on the GPU in f32 (the CPU's tolerances), f16 and bf16 (the documented
#      looser bounds of tests/common::bound; tests/half_precision.rs: PSNR against f32),
#   3. `afa bench` on full-size SD1.5 random weights at 512x512: UNet step at batch 2 (CFG),
#      VAE decode, text encoder, one AFA N=3 step, the attention paths (default vs sliced on
#      SD1.5's and the aggregators' shapes), a whole 50-step DDIM generation with one
#      model, AFA N=3 at 20 steps, and images/s at max-batch 1, 4, 8 (f16; UNet/VAE in f32 too).
# It writes OUTDIR/summary.md (every step's status and time, the PSNR lines and every bench
# table: paste into BENCHMARKS.md) and one log per step. A failing step is recorded and the
# rest still run; the exit status is 1 when any step failed. Each bench has its own time limit
# so the run ends in time and reports what it measured.
#
#   scripts/gpu_check.sh [--out DIR]     # DIR defaults to $OUT, else ./gpu-check-out
#   scripts/gpu_check.sh --cpu-dry-run   # the same steps on the CPU: no cuda feature, the dev
#                                        # profile, f32 and f16 tests, benches at tiny sizes
#
# AFA_GPU_FLASH_ATTN=1 builds with --features cuda,flash-attn (FlashAttention-2 for f16/bf16
# attention on sm80+; the f16 benches then use it, and bench-attention compares it with the
# sliced path). Its kernels need a CUTLASS checkout (AFA_CUTLASS_GIT: a git URL or a local
# clone holding the commit, see scripts/cuda_env.sh) and add an estimated 15-30 minutes of nvcc
# on 16 cores the first time (53 kernels; one took ~4 CPU-minutes on the 2-core dev machine),
# kept in CANDLE_FLASH_ATTN_BUILD_DIR afterwards: more than one 10-minute run, so build it
# first (scripts/flash_attn_check.sh --build, in the background) and run this check after.
#
# Needs on the GPU machine: the Rust toolchain and the crates (network, or a filled
# ~/.cargo/registry), and a CUDA toolkit: a system one (nvcc on PATH, CUDA_HOME or
# /usr/local/cuda), else the pinned PyPI wheels of scripts/cuda_env.sh (needs PyPI). At run
# time candle loads libcuda, cuBLAS, cuRAND and NVRTC (the driver and the toolkit's libraries;
# AFA_CUDA_RUNTIME_WHEELS=1 adds the wheels' copies, put on LD_LIBRARY_PATH).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
outdir="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) dry=1 ;;
    --out) outdir="$2"; shift ;;
    *) echo "usage: $0 [--cpu-dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
outdir="${outdir:-$PWD/gpu-check-out}"
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
summary="$outdir/summary.md"
failed=0
started=$(date +%s)

if [ "$dry" = 1 ]; then
  features=() profile=dev bindir=target/debug device=cpu dtypes=(f32 f16)
  # Tiny sizes: the same code paths in seconds, not a measurement.
  unet=(--unet-sizes 8 --vae-latent 8 --repeats 1)
  gen=(--gen-size 64 --gen-steps 2 --afa-gen-steps 1 --gen-members 2 --throughput-batches 1,2 --repeats 1)
  afa=(--afa-members 2 --unet-sizes 8 --repeats 1)
  attn=(--repeats 1)
  limit=600
else
  features=(--features cuda) profile=release bindir=target/release device=cuda dtypes=(f32 f16 bf16)
  [ "${AFA_GPU_FLASH_ATTN:-0}" = 1 ] && features=(--features cuda,flash-attn)
  unet=(--unet-sizes 64 --vae-latent 64 --repeats 5)
  gen=(--gen-size 512 --gen-steps 50 --afa-gen-steps 20 --gen-members 3 --throughput-batches 1,4,8 --repeats 1)
  afa=(--afa-members 3 --unet-sizes 64 --repeats 3)
  attn=(--repeats 5)
  limit=150
  # shellcheck source=scripts/cuda_env.sh
  source scripts/cuda_env.sh
  afa_cuda_env || { echo "no CUDA toolkit (see the header of this script)" >&2; exit 1; }
  # The link wants libcudart.so, cuDNN & co by name: stubs only for what the machine lacks
  # (scripts/cuda_env.sh); at run time the loader must find the real ones.
  afa_cudart_link_path || exit 1
  afa_cuda_link_stubs || exit 1
  if [ "${AFA_GPU_FLASH_ATTN:-0}" = 1 ]; then
    afa_cutlass_checkout || exit 1
    export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
  fi
  if [ "${AFA_CUDA_RUNTIME_WHEELS:-0}" = 1 ]; then
    for lib in "$(afa_cuda_cache_dir)"/venv/lib/python3*/site-packages/nvidia/cu13/lib; do
      export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
    done
  fi
fi
parity_tests=(--test unet_parity --test vae_clip_parity --test pipeline_parity --test ensemble_parity --test half_precision)

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ) ($([ "$dry" = 1 ] && echo 'CPU dry run, tiny sizes: not a measurement' || echo "$device"))"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)'), $(nproc) cores"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
  fi
  echo
  echo "| step | status | s |"
  echo "|---|---|---:|"
} >"$summary"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >"$outdir/nvidia-smi.txt" 2>&1

# step NAME TIMEOUT_S CMD...: runs CMD with its output in NAME.log, one summary row.
step() {
  local name="$1" limit_s="$2"; shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name: $*"
  timeout "$limit_s" "$@" >"$outdir/$name.log" 2>&1
  rc=$?
  local status=ok
  if [ $rc = 124 ]; then status="timed out (${limit_s} s)"; failed=1
  elif [ $rc != 0 ]; then status="FAILED (exit $rc)"; failed=1; fi
  echo "| $name | $status | $(($(date +%s) - t0)) |" >>"$summary"
  echo "   $status; log $outdir/$name.log"
  [ $rc = 0 ]
}

step build 1200 cargo build --profile "$profile" "${features[@]}" --bin afa
step build-tests 1200 cargo test --profile "$profile" "${features[@]}" "${parity_tests[@]}" --no-run

for dt in "${dtypes[@]}"; do
  AFA_TEST_DEVICE=$device AFA_TEST_DTYPE=$dt step "tests-$dt" 300 \
    cargo test --profile "$profile" "${features[@]}" "${parity_tests[@]}" -- --nocapture
done

afa_bin="$bindir/afa"
if [ -x "$afa_bin" ]; then
  main=f16
  step bench-components-$main $limit "$afa_bin" bench --device $device --dtype $main \
    --parts unet,vae,text "${unet[@]}" --out "$outdir/bench-components-$main.md"
  step bench-components-f32 $limit "$afa_bin" bench --device $device --dtype f32 \
    --parts unet,vae "${unet[@]}" --out "$outdir/bench-components-f32.md"
  step bench-afa-step-$main $limit "$afa_bin" bench --device $device --dtype $main \
    --parts afa "${afa[@]}" --out "$outdir/bench-afa-step-$main.md"
  step bench-attention-$main $limit "$afa_bin" bench --device $device --dtype $main \
    --parts attention "${attn[@]}" --out "$outdir/bench-attention-$main.md"
  step bench-generate-$main $((2 * limit)) "$afa_bin" bench --device $device --dtype $main \
    --parts generate "${gen[@]}" --out "$outdir/bench-generate-$main.md"
  step bench-throughput-$main $((2 * limit)) "$afa_bin" bench --device $device --dtype $main \
    --parts throughput "${gen[@]}" --out "$outdir/bench-throughput-$main.md"
fi

{
  echo
  echo "total $(($(date +%s) - started)) s"
  echo
  echo "## Precision (tests/half_precision.rs and the parity bounds)"
  echo
  for f in "$outdir"/tests-*.log; do
    [ -f "$f" ] || continue
    echo "$(basename "$f" .log):"
    echo
    grep -E "PSNR|max abs error|final latent|image [0-9]|test result" "$f" | sed 's/^/    /'
    echo
  done
  for f in "$outdir"/bench-*.md; do
    [ -f "$f" ] || continue
    echo
    echo "## $(basename "$f" .md)"
    echo
    cat "$f"
  done
} >>"$summary"
echo "summary: $summary"
exit $failed
