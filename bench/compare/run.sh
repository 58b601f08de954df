#!/usr/bin/env bash
# Run the Dask, Celery and Ray comparison benchmarks and store their JSON.
#
#   bench/compare/run.sh           full run  -> bench/compare/results/{dask,celery,ray}.json
#   bench/compare/run.sh --quick   smoke test (small counts) -> results/quick/
#
# Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and Redis on 127.0.0.1:6379
# (override with CELERY_BENCH_BROKER / CELERY_BENCH_BACKEND).  Each peer's
# human-readable table goes to stderr; the JSON object goes to the file.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

quick=()
out="$here/results"
for arg in "$@"; do
    case "$arg" in
        --quick) quick=(--quick); out="$here/results/quick" ;;
        -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "run.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

"$here/setup.sh"
mkdir -p "$out"
# The peers share 2 cores with whatever else runs: say so when it is not idle.
load1="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    echo "run.sh: warning: 1-min load average is $load1; the machine is not idle, numbers will be noisy" >&2
fi
py="$here/.venv/bin/python"
status=0
for peer in dask celery ray; do
    echo "== $peer ==" >&2
    tmp="$(mktemp "$out/.$peer.XXXXXX")"
    start=$SECONDS
    if (cd "$here" && "$py" "${peer}_bench.py" "${quick[@]}" >"$tmp"); then
        # the bench prints exactly one JSON object on stdout: check, then keep it
        if "$py" -c 'import json,sys; json.load(open(sys.argv[1]))' "$tmp"; then
            "$py" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])), indent=2))' "$tmp" >"$out/$peer.json"
            echo "$peer: wrote $out/$peer.json ($((SECONDS - start))s)" >&2
        else
            echo "$peer: output was not one JSON object" >&2; status=1
        fi
    else
        echo "$peer: benchmark failed" >&2; status=1
    fi
    rm -f "$tmp"
done
exit $status
