# shellcheck shell=bash
# Source me: puts a CUDA toolkit for building candle's kernels on PATH, from PyPI wheels, without a GPU.
#
#   source scripts/cuda_env.sh        # sets CUDA_HOME/CUDA_PATH/CUDA_ROOT, PATH, CUDA_COMPUTE_CAP, CUDARC_CUDA_VERSION
#
# The wheels (nvcc, nvvm, crt headers, cudart headers, CCCL; ~130 MB) go into a venv OUTSIDE the
# clone, $AFA_CUDA_CACHE/venv (default /var/cache/afa-cuda, else ~/.cache/afa-cuda), reused across
# runs and recreated when broken or when the pins below change. They install one tree,
# site-packages/nvidia/cu13/{bin,include,lib,nvvm}, which is what CUDA_HOME points at.
#
# If a real toolkit is already there (CUDA_HOME set, or nvcc on PATH, or /usr/local/cuda/bin/nvcc)
# and AFA_CUDA_FROM_WHEELS is not 1, that one is used instead and nothing is installed.
#
# Pins: cudarc 0.19 (candle 0.11) knows CUDA versions up to 13.4 and panics on newer nvcc, so the
# toolkit is pinned to 13.4.92 and CUDARC_CUDA_VERSION says 13040 either way.
# Extra wheels for a runtime (cuBLAS, cuRAND, NVRTC, for running on a GPU machine):
# AFA_CUDA_RUNTIME_WHEELS=1.

AFA_CUDA_PINS=(
  "nvidia-cuda-nvcc==13.4.92"
  "nvidia-nvvm==13.4.92"
  "nvidia-cuda-crt==13.4.92"
  "nvidia-cuda-runtime==13.4.92"
  "nvidia-cuda-cccl==13.3.4.3.1"
)
AFA_CUDA_RUNTIME_PINS=(
  "nvidia-cublas==13.4.3.11"
  "nvidia-curand==10.4.4.72"
  "nvidia-cuda-nvrtc==13.4.92"
)

afa_cuda_cache_dir() {
  if [ -n "${AFA_CUDA_CACHE:-}" ]; then
    echo "$AFA_CUDA_CACHE"
  elif mkdir -p /var/cache/afa-cuda 2>/dev/null && [ -w /var/cache/afa-cuda ]; then
    echo /var/cache/afa-cuda
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/afa-cuda"
  fi
}

afa_cuda_from_wheels() {
  local cache venv pins marker want tree
  cache="$(afa_cuda_cache_dir)"
  venv="$cache/venv"
  marker="$venv/.afa-pins"
  pins=("${AFA_CUDA_PINS[@]}")
  if [ "${AFA_CUDA_RUNTIME_WHEELS:-0}" = 1 ]; then pins+=("${AFA_CUDA_RUNTIME_PINS[@]}"); fi
  want="$(printf '%s\n' "${pins[@]}")"
  mkdir -p "$cache"
  # Reuse the venv only when its python runs, the pins are the same, and nvcc answers.
  if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys' 2>/dev/null \
      && [ "$(cat "$marker" 2>/dev/null)" = "$want" ] \
      && "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc --version >/dev/null 2>&1; }; then
    echo "cuda_env: (re)creating $venv with ${pins[*]}" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" || return 1
    "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}" >&2 || return 1
    printf '%s\n' "${pins[@]}" >"$marker"
  fi
  tree="$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)"
  [ -x "$tree/bin/nvcc" ] || { echo "cuda_env: no nvcc under $tree" >&2; return 1; }
  export CUDA_HOME="$tree" CUDA_PATH="$tree" CUDA_ROOT="$tree"
  export PATH="$tree/bin:$PATH"
  # cudarc's build script looks for libraries under CUDA_HOME/lib64 too; the wheels' are in lib.
  export LD_LIBRARY_PATH="$tree/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# The source of crate $1 at the version Cargo.lock pins, from cargo's registry (fetched when
# missing). Run from the repository root.
afa_crate_src() {
  local name="$1" version src
  version="$(grep -A1 "^name = \"$name\"\$" Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p' | head -1)"
  [ -n "$version" ] || { echo "cuda_env: $name is not in Cargo.lock" >&2; return 1; }
  src="${CARGO_HOME:-$HOME/.cargo}/registry/src/*/$name-$version"
  # shellcheck disable=SC2086 # the glob is meant
  set -- $src
  if [ ! -d "$1" ]; then
    cargo fetch --locked -q >&2 || return 1
    # shellcheck disable=SC2086
    set -- $src
  fi
  [ -d "$1" ] || { echo "cuda_env: no source of $name $version in cargo's registry" >&2; return 1; }
  echo "$1"
}

afa_cuda_env() {
  if [ "${AFA_CUDA_FROM_WHEELS:-0}" != 1 ]; then
    if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
      export PATH="$CUDA_HOME/bin:$PATH"
    elif command -v nvcc >/dev/null 2>&1; then
      CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"; export CUDA_HOME
    elif [ -x /usr/local/cuda/bin/nvcc ]; then
      export CUDA_HOME=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH"
    else
      afa_cuda_from_wheels || return 1
    fi
  else
    afa_cuda_from_wheels || return 1
  fi
  export CUDA_PATH="${CUDA_PATH:-$CUDA_HOME}" CUDA_ROOT="${CUDA_ROOT:-$CUDA_HOME}"
  # H100/H200 by default; the kernels are compiled for this one architecture.
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  # cudarc 0.19 picks its bindings from nvcc's version and knows up to 13.4.
  export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
  echo "cuda_env: CUDA_HOME=$CUDA_HOME ($(nvcc --version | tail -2 | head -1)), compute cap $CUDA_COMPUTE_CAP" >&2
}

# Linking `--features flash-attn`: candle-flash-attn's build script asks for `-lcudart` (its
# kernels' launches go through the CUDA runtime) but names no directory to find it in, and the
# wheels ship only the versioned libcudart.so.13. This puts a directory holding an unversioned
# libcudart.so (the toolkit's own, or a link to the versioned one) on LIBRARY_PATH, which the
# linker driver searches for -l and cargo does not fingerprint, so nothing is rebuilt for it.
# At run time the binary needs libcudart.so.13 where the loader looks (LD_LIBRARY_PATH above for
# the wheels; a system toolkit's lib64 is normally in ld.so.conf).
afa_cudart_link_path() {
  local lib dir
  for lib in "$CUDA_HOME/lib64" "$CUDA_HOME/lib" "$CUDA_HOME/targets/x86_64-linux/lib"; do
    if [ -e "$lib/libcudart.so" ]; then dir="$lib"; break; fi
  done
  if [ -z "${dir:-}" ]; then
    local versioned="" candidate
    for candidate in "$CUDA_HOME"/lib64/libcudart.so.* "$CUDA_HOME"/lib/libcudart.so.*; do
      if [ -e "$candidate" ]; then versioned="$candidate"; break; fi
    done
    [ -n "$versioned" ] || { echo "cuda_env: no libcudart.so* under $CUDA_HOME" >&2; return 1; }
    dir="$(afa_cuda_cache_dir)/link"
    mkdir -p "$dir"
    ln -sf "$versioned" "$dir/libcudart.so"
  fi
  export LIBRARY_PATH="$dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
}

# Linking on a machine without the CUDA libraries (no GPU, the wheels' toolkit): candle-core
# turns on cudarc's `dynamic-linking`, so every `--features cuda` binary is linked with -lcuda
# -lnvrtc -lcurand -lcublas -lcublasLt -lcudnn, none of which the nvcc wheels ship (libcuda
# comes with the driver). This makes link-only stubs, as the toolkit's own lib64/stubs do: for
# each library the toolkit lacks, a shared object with the real SONAME that defines every
# function cudarc's bindings name for it (the `load::<_F>("...")` names in its sys modules).
# The binary then records the real SONAMEs, and on a GPU machine the loader finds the driver's
# and the toolkit's libraries; the stubs are never loaded. On LIBRARY_PATH, after real ones.
AFA_CUDA_STUB_LIBS=(
  "driver cuda libcuda.so.1"
  "nvrtc nvrtc libnvrtc.so.13"
  "curand curand libcurand.so.10"
  "cublas cublas libcublas.so.13"
  "cublaslt cublasLt libcublasLt.so.13"
  "cudnn cudnn libcudnn.so.9"
)

afa_cuda_link_stubs() {
  local cudarc dir entry module lib soname
  cudarc="$(afa_crate_src cudarc)" || return 1
  dir="$(afa_cuda_cache_dir)/link-stubs"
  mkdir -p "$dir"
  for entry in "${AFA_CUDA_STUB_LIBS[@]}"; do
    read -r module lib soname <<<"$entry"
    if [ -e "$CUDA_HOME/lib64/lib$lib.so" ] || [ -e "$CUDA_HOME/lib/lib$lib.so" ] \
        || ldconfig -p 2>/dev/null | grep -q "lib$lib\.so "; then
      continue
    fi
    grep -o 'load::<_F>("[A-Za-z0-9_]*")' "$cudarc/src/$module/sys/mod.rs" \
      | sed 's/.*("\(.*\)")/void \1(void) {}/' | sort -u >"$dir/$lib.c"
    cc -shared -fPIC -o "$dir/$soname" -Wl,-soname,"$soname" "$dir/$lib.c" || return 1
    ln -sf "$soname" "$dir/lib$lib.so"
  done
  export LIBRARY_PATH="${LIBRARY_PATH:+$LIBRARY_PATH:}$dir"
}

# The CUTLASS checkout candle-flash-attn's build compiles against (the `flash-attn` feature).
# Its build script (cudaforge) would `git clone` NVIDIA/cutlass from GitHub at a pinned commit;
# it uses a checkout at $CUDAFORGE_HOME/git/checkouts/cutlass-<16 hex of the commit> whose HEAD
# is that commit instead. This makes one, outside the clone, from AFA_CUTLASS_GIT (any git URL
# or local repository holding the commit: a mirror where GitHub cannot be reached), and exports
# CUDAFORGE_HOME. The compiled kernels are kept in CANDLE_FLASH_ATTN_BUILD_DIR, also outside.
AFA_CUTLASS_COMMIT=7d49e6c7e2f8896c47f586706e67e1fb215529dc  # candle-flash-attn 0.11.1's build.rs

afa_cutlass_checkout() {
  local cache dir
  cache="$(afa_cuda_cache_dir)"
  export CUDAFORGE_HOME="$cache/cudaforge"
  export CANDLE_FLASH_ATTN_BUILD_DIR="$cache/flash-attn-kernels"
  mkdir -p "$CANDLE_FLASH_ATTN_BUILD_DIR"
  dir="$CUDAFORGE_HOME/git/checkouts/cutlass-${AFA_CUTLASS_COMMIT:0:16}"
  if [ "$(git -C "$dir" rev-parse HEAD 2>/dev/null)" = "$AFA_CUTLASS_COMMIT" ] \
      && [ -f "$dir/include/cutlass/cutlass.h" ]; then
    return 0
  fi
  local src="${AFA_CUTLASS_GIT:-https://github.com/NVIDIA/cutlass.git}"
  echo "cuda_env: checking out CUTLASS $AFA_CUTLASS_COMMIT from $src into $dir" >&2
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  # Only the headers the kernels include (as cudaforge's own sparse checkout): no docs or media.
  git clone -q --no-checkout "$src" "$dir" \
    && git -C "$dir" sparse-checkout set include tools/util/include \
    && git -C "$dir" -c advice.detachedHead=false checkout -q "$AFA_CUTLASS_COMMIT" \
    && [ -f "$dir/include/cutlass/cutlass.h" ] \
    || { echo "cuda_env: CUTLASS $AFA_CUTLASS_COMMIT not available from $src" >&2; return 1; }
}
