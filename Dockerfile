# syntax=docker/dockerfile:1
#
# Flotilla's images (docs/operations.md, "The images"):
#
#   docker build -t flotilla .                           # runtime: flotilla-scheduler and the demo flotilla-worker
#   docker build --target examples -t flotilla-examples .  # the same, plus the example programs
#   docker run --rm flotilla flotilla-scheduler --help
#
# The default image (the last stage, `runtime`) holds the two binaries only,
# built with the `dist` profile (release, no debug info, symbols kept for
# task tracebacks); your own worker's image is built the same way by
# examples/template/Dockerfile.

# ---- build -----------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cargo's registry and the target directory are BuildKit caches, so rebuilds
# only compile what changed; the binaries are copied out to /out because a
# cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked \
        -p flotilla-cli -p flotilla-examples \
        --bin flotilla-scheduler --bin flotilla-worker \
    && mkdir -p /out/bin \
    && cp target/dist/flotilla-scheduler target/dist/flotilla-worker /out/bin/ \
    && ls -l /out/bin

# ---- the example programs (only for --target examples) ---------------------
FROM build AS build-examples
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p flotilla-examples --examples \
    && mkdir -p /out/examples \
    && find target/dist/examples -maxdepth 1 -type f -perm -u+x ! -name '*.d' \
        -regextype posix-extended ! -regex '.*-[0-9a-f]{16}' \
        -exec cp {} /out/examples/ \; \
    && ls -l /out/examples

# ---- what every image runs on ------------------------------------------------
FROM debian:bookworm-slim AS base
# ca-certificates: amqps:// and rediss:// check the servers' certificates
# against the system's trust store.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin flotilla
ENV RUST_LOG=info
USER flotilla:flotilla
# The scheduler's HTTP endpoint (status API, /metrics, dashboard) when it is
# started with --http-addr 0.0.0.0:8787.
EXPOSE 8787
CMD ["flotilla-scheduler"]

# ---- examples: the runtime and the example programs, on PATH ----------------
# docker-compose.yml's `example` service.
FROM base AS examples
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build-examples /out/examples/ /usr/local/lib/flotilla/examples/
ENV PATH=/usr/local/lib/flotilla/examples:$PATH

# ---- runtime (the default): flotilla-scheduler and flotilla-worker ----------
FROM base AS runtime
COPY --from=build /out/bin/ /usr/local/bin/
