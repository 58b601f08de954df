#!/usr/bin/env bash
# The main job: bring up RabbitMQ and Redis, build Flotilla, start a small
# local cluster (one scheduler, two workers) in a fresh namespace and run the
# examples against it.
#
#   bash scripts/demo.sh                  # the default examples
#   bash scripts/demo.sh basic_submit     # only some of them
#
# Environment:
#   FLOTILLA_AMQP_URL, FLOTILLA_REDIS_URL  brokers (default: local guest/guest, redis db 0)
#   FLOTILLA_DEMO_TIMEOUT                  seconds allowed per example (default 120)
#   RUST_LOG                               log filter for scheduler/workers (default info)
#
# Logs of the scheduler and workers go to .flotilla-run/*.log. Exits non-zero
# if any example fails.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUN_DIR="$ROOT/.flotilla-run"

DEFAULT_EXAMPLES=(basic_submit multiple_tasks map_over_inputs dependencies error_handling
    wait_example semaphore_example retries datasets priority worker_placement local_cluster)
EXAMPLE_TIMEOUT="${FLOTILLA_DEMO_TIMEOUT:-120}"

say() { printf '[demo] %s\n' "$*"; }
banner() { printf '\n==================== %s ====================\n' "$*"; }

PIDS=()
NAMES=()
EXAMPLE_PID=""

# Stop the scheduler and workers: SIGTERM, up to 15 s to finish, then SIGKILL.
cleanup() {
    local rc=$? i deadline alive
    trap - EXIT INT TERM
    if [[ -n $EXAMPLE_PID ]]; then
        kill -TERM "$EXAMPLE_PID" 2>/dev/null || true
        wait "$EXAMPLE_PID" 2>/dev/null || true
    fi
    if ((${#PIDS[@]} > 0)); then
        say "stopping the scheduler and workers (SIGTERM)"
        for i in "${!PIDS[@]}"; do
            kill -TERM "${PIDS[$i]}" 2>/dev/null || true
        done
        deadline=$((SECONDS + 15))
        while :; do
            alive=()
            for i in "${!PIDS[@]}"; do
                if kill -0 "${PIDS[$i]}" 2>/dev/null; then alive+=("${NAMES[$i]}"); fi
            done
            ((${#alive[@]} > 0)) || break
            if ((SECONDS >= deadline)); then
                say "still running after 15 s, killing: ${alive[*]}"
                for i in "${!PIDS[@]}"; do kill -KILL "${PIDS[$i]}" 2>/dev/null || true; done
                break
            fi
            sleep 0.2
        done
        for i in "${!PIDS[@]}"; do wait "${PIDS[$i]}" 2>/dev/null || true; done
        say "stopped; logs are in .flotilla-run/"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_log_tail() { # file
    [[ -s $1 ]] || return 0
    printf -- '--- last lines of %s ---\n' "${1#"$ROOT"/}"
    tail -n 30 "$1" || true
}

banner "services (RabbitMQ, Redis)"
bash "$ROOT/scripts/services.sh"

banner "build: cargo build --release --workspace --bins --examples"
cargo build --release --workspace --bins --examples

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
BIN="$TARGET_DIR/release"
for b in flotilla-scheduler flotilla-worker; do
    [[ -x $BIN/$b ]] || {
        say "ERROR: $BIN/$b was not built"
        exit 1
    }
done

export FLOTILLA_AMQP_URL="${FLOTILLA_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export FLOTILLA_REDIS_URL="${FLOTILLA_REDIS_URL:-redis://127.0.0.1:6379/0}"
FLOTILLA_NAMESPACE="demo-$(date +%s)"
export FLOTILLA_NAMESPACE
export RUST_LOG="${RUST_LOG:-info}"

banner "cluster: namespace $FLOTILLA_NAMESPACE"
mkdir -p "$RUN_DIR"

# The URLs (which may carry passwords) reach the processes through the
# environment, not the command line, so they don't show in `ps`.
start() { # name log command...
    local name=$1 logfile=$2
    shift 2
    "$@" >"$logfile" 2>&1 &
    PIDS+=($!)
    NAMES+=("$name")
    say "started $name (pid $!), log: ${logfile#"$ROOT"/}"
}

start scheduler "$RUN_DIR/scheduler.log" \
    "$BIN/flotilla-scheduler" --namespace "$FLOTILLA_NAMESPACE"
for n in 1 2; do
    start "worker-$n" "$RUN_DIR/worker-$n.log" \
        "$BIN/flotilla-worker" --namespace "$FLOTILLA_NAMESPACE" --nthreads 2 --name "demo-worker-$n"
done

sleep 1
for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
        say "ERROR: ${NAMES[$i]} exited during startup"
        show_log_tail "$RUN_DIR/${NAMES[$i]}.log"
        exit 1
    fi
done

if (($# > 0)); then examples=("$@"); else examples=("${DEFAULT_EXAMPLES[@]}"); fi
passed=()
failed=()
for ex in "${examples[@]}"; do
    banner "example: $ex"
    if [[ ! -x $BIN/examples/$ex ]]; then
        say "$ex: FAILED (no binary $BIN/examples/$ex)"
        failed+=("$ex")
        continue
    fi
    # Run in the background and `wait`, so that a SIGTERM/SIGINT sent to this
    # script is handled at once (cleanup stops the example too).
    timeout "$EXAMPLE_TIMEOUT" "$BIN/examples/$ex" &
    EXAMPLE_PID=$!
    rc=0
    wait "$EXAMPLE_PID" || rc=$?
    EXAMPLE_PID=""
    if ((rc == 0)); then
        say "$ex: ok"
        passed+=("$ex")
    elif ((rc == 124)); then
        say "$ex: FAILED (no result within ${EXAMPLE_TIMEOUT} s)"
        failed+=("$ex")
    else
        say "$ex: FAILED (exit status $rc)"
        failed+=("$ex")
    fi
done

# A scheduler or worker that died along the way explains most failures.
for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
        say "${NAMES[$i]} is no longer running"
        show_log_tail "$RUN_DIR/${NAMES[$i]}.log"
    fi
done

banner "summary (namespace $FLOTILLA_NAMESPACE)"
say "passed: ${#passed[@]}/${#examples[@]}${passed[*]:+ (${passed[*]})}"
if ((${#failed[@]} > 0)); then
    say "failed: ${failed[*]}"
    for n in "${NAMES[@]}"; do show_log_tail "$RUN_DIR/$n.log"; done
    exit 1
fi
say "all examples passed"
