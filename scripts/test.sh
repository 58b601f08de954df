#!/usr/bin/env bash
# The whole test suite: unit tests and the end-to-end tests, which run
# against a real RabbitMQ and Redis (each test in its own namespace).
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -- --nocapture  # extra arguments go to `cargo test`
#
# FLOTILLA_AMQP_URL / FLOTILLA_REDIS_URL select the brokers (default: local).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

banner() { printf '\n==================== %s ====================\n' "$*"; }

banner "Flotilla test suite"

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

# The end-to-end tests start the scheduler and worker binaries, so they are
# built first.
banner "cargo build --workspace --bins --examples --locked"
cargo build --workspace --bins --examples --locked

banner "cargo test --workspace --locked${*:+ $*}"
cargo test --workspace --locked "$@"

banner "all tests passed"
