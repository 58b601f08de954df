#!/usr/bin/env bash
# The whole test suite: the Kubernetes manifests of deploy/ (rendered and
# validated, scripts/validate-deploy.sh), unit tests and the end-to-end
# tests, which run against a real RabbitMQ and Redis (each test in its own
# namespace).
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh chaos           # extra arguments go to the test runner
#
# The runner is cargo-nextest when it is installed (tests of every binary run
# side by side, see .config/nextest.toml; the doc tests then run with
# `cargo test --doc`), otherwise `cargo test`, which runs the same tests one
# binary at a time and takes about twice as long.
#
# FLOTILLA_AMQP_URL / FLOTILLA_REDIS_URL select the brokers (default: local).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

banner() { printf '\n==================== %s ====================\n' "$*"; }

banner "Flotilla test suite"

# Cheap, so first: the Kubernetes manifests render and match the schemas.
banner "deploy/: kubectl kustomize + schema validation"
bash "$ROOT/scripts/validate-deploy.sh"

banner "services (RabbitMQ, Redis)"
bash "$ROOT/scripts/services.sh"

# tests/ops.rs checks the dashboard in a real headless Chromium, and fails
# without one: install Debian's when it is missing.
if ! command -v chromium >/dev/null 2>&1; then
    banner "apt-get install -y chromium"
    root=()
    [[ $(id -u) -eq 0 ]] || root=(sudo -n)
    apt() { "${root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" </dev/null; }
    apt install -y -q chromium || { apt update -q && apt install -y -q chromium; } || {
        echo "chromium could not be installed; the dashboard test needs it" >&2
        exit 1
    }
fi

# tests/user_crate.rs runs clippy on a user's project, as a user's CI would:
# add the rustup component when a minimal toolchain lacks it.
if ! cargo clippy --version >/dev/null 2>&1; then
    banner "rustup component add clippy"
    rustup component add clippy
fi

# The end-to-end tests start the scheduler and worker binaries, so they are
# built first.
banner "cargo build --workspace --bins --examples --locked"
cargo build --workspace --bins --examples --locked

if cargo nextest --version >/dev/null 2>&1; then
    banner "cargo nextest run --workspace --locked${*:+ $*}"
    cargo nextest run --workspace --locked "$@"
    if [[ $# -eq 0 ]]; then
        banner "cargo test --workspace --doc --locked"
        cargo test --workspace --doc --locked
    fi
else
    banner "cargo-nextest is not installed: cargo test --workspace --locked${*:+ $*}"
    cargo test --workspace --locked "$@"
fi

banner "all tests passed"
