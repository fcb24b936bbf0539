# afa-server images. Two targets:
#   docker build --target cpu  -t afa-server:cpu  .
#   docker build --target cuda -t afa-server:cuda .      (built with --features cuda: candle's CUDA
#        backend and cuDNN, the feature set scripts/cuda_check.sh checks in CI; add
#        --build-arg CUDA_COMPUTE_CAP=90 for H100/H200; --build-arg AFA_CUDA_FEATURES=flash-attn
#        adds FlashAttention-2 for sm80+: its build clones CUTLASS from GitHub and compiles 53
#        kernels, tens of minutes on many cores)
# Models are not baked in: mount a folder with models.toml (and the weights it names) at
# /models. The repository's tiny ensemble is copied in so the image also runs with no mount.
#   docker run -p 8080:8080 -v $PWD/models:/models afa-server:cpu

# ---- build (CPU)
FROM rust:1-bookworm AS build-cpu
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin afa

# ---- build (CUDA): the devel image has nvcc and the CUDA libraries candle links
FROM nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04 AS build-cuda
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config git \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH
# Compute capability of the target GPUs (8.0 = A100, 8.9 = L4/4090, 9.0 = H100).
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
# `cuda` (the default), or `flash-attn` (cuda plus FlashAttention-2). flash-attn links -lcudart
# without saying where it is, hence the toolkit's lib64 on the linker's LIBRARY_PATH.
ARG AFA_CUDA_FEATURES=cuda
ENV LIBRARY_PATH=/usr/local/cuda/lib64:${LIBRARY_PATH}
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features "${AFA_CUDA_FEATURES}" --bin afa

# ---- runtime (CPU)
FROM debian:bookworm-slim AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /app afa
WORKDIR /app
COPY --from=build-cpu /src/target/release/afa /usr/local/bin/afa
COPY --chown=afa models.toml /models/models.toml
COPY --chown=afa tests/fixtures/tiny-sd /models/tests/fixtures/tiny-sd
COPY --chown=afa tests/fixtures/tiny-sd-b /models/tests/fixtures/tiny-sd-b
COPY --chown=afa tests/fixtures/afa/n2 /models/tests/fixtures/afa/n2
USER afa
ENV AFA_CONFIG=/models/models.toml AFA_BIND=0.0.0.0:8080
VOLUME ["/models"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["afa"]
CMD ["serve"]

# ---- runtime (CUDA)
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS cuda
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /app afa
WORKDIR /app
COPY --from=build-cuda /src/target/release/afa /usr/local/bin/afa
COPY --chown=afa models.toml /models/models.toml
COPY --chown=afa tests/fixtures/tiny-sd /models/tests/fixtures/tiny-sd
COPY --chown=afa tests/fixtures/tiny-sd-b /models/tests/fixtures/tiny-sd-b
COPY --chown=afa tests/fixtures/afa/n2 /models/tests/fixtures/afa/n2
USER afa
ENV AFA_CONFIG=/models/models.toml AFA_BIND=0.0.0.0:8080 AFA_DEVICE=cuda
VOLUME ["/models"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["afa"]
CMD ["serve"]
