# syntax=docker/dockerfile:1
#
# Flotilla image: flotilla-scheduler, the demo flotilla-worker (built with the
# example tasks) and the example programs (basic_submit, ...), all on PATH.
#
#   docker build -t flotilla .
#   docker run --rm flotilla flotilla-scheduler --help

# ---- build -----------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cargo's registry and the target directory are BuildKit caches, so rebuilds
# only compile what changed; the binaries are copied out to /out because a
# cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins --examples \
    && mkdir -p /out/bin /out/examples \
    && cp target/release/flotilla-scheduler target/release/flotilla-worker /out/bin/ \
    && find target/release/examples -maxdepth 1 -type f -perm -u+x ! -name '*.d' \
        -regextype posix-extended ! -regex '.*-[0-9a-f]{16}' \
        -exec cp {} /out/examples/ \; \
    && ls -l /out/bin /out/examples

# ---- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin flotilla
COPY --from=builder /out/bin/ /usr/local/bin/
COPY --from=builder /out/examples/ /usr/local/lib/flotilla/examples/
ENV PATH=/usr/local/lib/flotilla/examples:$PATH \
    RUST_LOG=info
USER flotilla:flotilla
# The scheduler's HTTP endpoint (status API, /metrics, dashboard) when it is
# started with --http-addr 0.0.0.0:8787.
EXPOSE 8787
CMD ["flotilla-scheduler"]
