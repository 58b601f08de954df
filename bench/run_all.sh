#!/usr/bin/env bash
# One command for the whole comparison: Flotilla, Dask, Celery and Ray on this
# machine, against the same local RabbitMQ and Redis, then BENCHMARKS.md.
#
#   bash bench/run_all.sh            # Flotilla (without the 1M workload) + the three peers (~12 min)
#   bash bench/run_all.sh --full     # adds Flotilla's 1,000,000-task workloads
#   bash bench/run_all.sh --no-peers # Flotilla only; keeps the peers' last results
#
# The large-value rows (data_*, issue 15) are part of every run and get their
# own table in BENCHMARKS.md; to run only them, Flotilla, Dask and Ray side by
# side: bash bench/compare/run.sh --only data
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

full=()
peers=1
for arg in "$@"; do
    case "$arg" in
        --full) full=(--full) ;;
        --no-peers) peers=0 ;;
        -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "run_all.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

bash scripts/services.sh
cargo build --release --locked --workspace --bins
mkdir -p bench/results
echo "== flotilla ==" >&2
target/release/flotilla-bench --workers 2 --json "${full[@]}" | tail -n 1 >bench/results/flotilla.json
if ((peers)); then
    bash bench/compare/run.sh
fi
python3 bench/report.py \
    --command "bash bench/run_all.sh $*" \
    bench/results/flotilla.json bench/compare/results/dask.json bench/compare/results/celery.json \
    bench/compare/results/ray.json \
    >BENCHMARKS.md
echo "wrote BENCHMARKS.md" >&2
