#!/usr/bin/env bash
# Scaling figures (issue 17, item 6): throughput of 10,000 and 100,000 no-op
# tasks with 1, 2, 4 and 8 worker processes (1 slot each), and the
# scheduler's own CPU time per task, against three targets:
#   single-node     the local RabbitMQ node (classic queues) and local Redis;
#   3-node-quorum   a private 3-node RabbitMQ cluster on this machine (quorum
#                   queues, every process given the three nodes), local Redis;
#   redis-cluster   the local RabbitMQ node and a private 6-node Redis Cluster
#                   on this machine (3 masters, 3 replicas, redis+cluster://).
# Each configuration runs `--repeats` times, the targets alternating.
#
#   cargo build --release --locked -p flotilla-bench -p flotilla-cli -p flotilla-examples --bins
#   bash bench/scale.sh [--repeats N] [--workers "1 2 4 8"] [--targets "single-node redis-cluster"]
#                       [--only throughput,roundtrip,chain]   # ~15 min for everything
# (--only goes to flotilla-bench: throughput by default; with roundtrip and
# chain the lines carry their figures too.)
#
# Prints one line per run (`scale <target> workers=N 10k=… 100k=…
# scheduler_cpu_us_per_task=…`) and leaves the cluster's nodes stopped and
# their directories deleted.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

repeats=2
workers="1 2 4 8"
targets="single-node 3-node-quorum redis-cluster"
only="throughput"
while (($#)); do
    case "$1" in
        --repeats) repeats="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --targets) targets="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "scale.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

bench="$root/target/release/flotilla-bench"
[[ -x "$bench" ]] || { echo "scale.sh: build $bench first (see the header)" >&2; exit 1; }
bash scripts/services.sh >/dev/null

wants() { [[ " $targets " == *" $1 "* ]]; }

# --- a private 3-node RabbitMQ cluster -------------------------------------
dirs=()
nodes=()
redis_pids=()
cleanup() {
    for node in "${nodes[@]}"; do rabbitmqctl -n "$node" stop >/dev/null 2>&1 || true; done
    for pid in "${redis_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for dir in "${dirs[@]}"; do rm -rf "$dir"; done
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
urls=()
cluster_url=""
if wants 3-node-quorum; then
for i in 0 1 2; do
    port=$(free_port)
    dist=$(free_port)
    dir=$(mktemp -d "/tmp/flotilla-scale-rabbit-$i-XXXX")
    node="flotilla-scale-$port@localhost"
    printf '[].\n' >"$dir/enabled_plugins"
    printf 'listeners.tcp.default = %s\nloopback_users = none\n' "$port" >"$dir/rabbitmq.conf"
    chown -R rabbitmq:rabbitmq "$dir" 2>/dev/null || true
    RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$dist" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
        RABBITMQ_PID_FILE="$dir/pid" rabbitmq-server -detached >/dev/null 2>&1
    dirs+=("$dir")
    nodes+=("$node")
    urls+=("amqp://guest:guest@127.0.0.1:$port/%2f")
done
for i in 0 1 2; do rabbitmqctl -n "${nodes[$i]}" wait --timeout 120 "${dirs[$i]}/pid" >/dev/null; done
for i in 1 2; do
    rabbitmqctl -n "${nodes[$i]}" stop_app >/dev/null
    rabbitmqctl -n "${nodes[$i]}" join_cluster "${nodes[0]}" >/dev/null
    rabbitmqctl -n "${nodes[$i]}" start_app >/dev/null
done
cluster_url=$(IFS=,; echo "${urls[*]}")
echo "scale: a 3-node RabbitMQ cluster: ${nodes[*]}" >&2
fi

# --- a private 6-node Redis Cluster (3 masters, 3 replicas) -----------------
redis_cluster_url=""
if wants redis-cluster; then
    rdir=$(mktemp -d /tmp/flotilla-scale-redis-XXXX)
    dirs+=("$rdir")
    seeds=()
    for i in 0 1 2 3 4 5; do
        port=$(free_port)
        bus=$(free_port)
        mkdir -p "$rdir/$port"
        redis-server --port "$port" --cluster-enabled yes --cluster-port "$bus" \
            --cluster-config-file "$rdir/$port/nodes.conf" --dir "$rdir/$port" \
            --save '' --appendonly no --bind 127.0.0.1 --logfile "$rdir/$port/redis.log" &
        redis_pids+=($!)
        seeds+=("127.0.0.1:$port")
    done
    for seed in "${seeds[@]}"; do
        until redis-cli -p "${seed#*:}" ping >/dev/null 2>&1; do sleep 0.1; done
    done
    redis-cli --cluster create "${seeds[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
    for seed in "${seeds[@]}"; do
        until redis-cli -p "${seed#*:}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; do
            sleep 0.2
        done
    done
    redis_cluster_url="redis+cluster://$(IFS=,; echo "${seeds[*]}")"
    echo "scale: a 6-node Redis Cluster: ${seeds[*]}" >&2
fi

# --- runs --------------------------------------------------------------------
# The scheduler's CPU time (user + system, clock ticks) from /proc, sampled
# while the bench runs: its last reading before it exits.
scheduler_ticks() {
    local pid
    pid=$(pgrep -n -f "flotilla-scheduler.*$1" || true)
    [[ -n "$pid" ]] || { echo 0; return; }
    awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0
}
run() { # target amqp_url queue_type redis_url workers
    local target="$1" url="$2" kind="$3" redis="$4" n="$5" out ticks=0 now
    out=$(mktemp)
    FLOTILLA_AMQP_URL="$url" FLOTILLA_QUEUE_TYPE="$kind" FLOTILLA_REDIS_URL="$redis" \
        "$bench" --workers "$n" --only "$only" --json >"$out" 2>/dev/null &
    local bench_pid=$!
    while kill -0 "$bench_pid" 2>/dev/null; do
        now=$(scheduler_ticks "")
        ((now > ticks)) && ticks=$now
        sleep 0.2
    done
    wait "$bench_pid"
    python3 - "$out" "$target" "$n" "$ticks" "$(getconf CLK_TCK)" <<'EOF'
import json, sys
path, target, n, ticks, hz = sys.argv[1:]
row = json.loads(open(path).read().strip().splitlines()[-1])
tasks = 110_000 + 2 * int(n)  # 10k + 100k, and each worker's warm-up task
cpu_us = int(ticks) / int(hz) * 1e6 / tasks
line = f"scale {target} workers={n}"
if row.get("throughput_10k_tasks_per_s") is not None:
    line += (f" 10k={row['throughput_10k_tasks_per_s']:.0f}"
             f" 100k={row['throughput_100k_tasks_per_s']:.0f}"
             f" scheduler_cpu_us_per_task={cpu_us:.1f}")
for key in ("roundtrip_p50_ms", "roundtrip_p99_ms", "chain_ms_per_task"):
    if row.get(key) is not None:
        line += f" {key}={row[key]:.2f}"
print(line)
EOF
    rm -f "$out"
}
single_url="${FLOTILLA_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
single_redis="${FLOTILLA_REDIS_URL:-redis://127.0.0.1:6379}"
for ((r = 0; r < repeats; r++)); do
    for n in $workers; do
        if wants single-node; then run single-node "$single_url" classic "$single_redis" "$n"; fi
        if wants 3-node-quorum; then run 3-node-quorum "$cluster_url" quorum "$single_redis" "$n"; fi
        if wants redis-cluster; then run redis-cluster "$single_url" classic "$redis_cluster_url" "$n"; fi
    done
done
