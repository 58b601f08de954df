#!/usr/bin/env bash
# Run the Dask, Celery and Ray comparison benchmarks and store their JSON.
#
#   bench/compare/run.sh                 full run  -> bench/compare/results/{dask,celery,ray}.json
#   bench/compare/run.sh --quick         smoke test (small counts) -> results/quick/
#   bench/compare/run.sh --only data     the data-plane rows (issue 15) of Flotilla, Dask and Ray
#                                        -> results/data/{flotilla,dask,ray}.json and table.md
#                                        (the table is also printed on stdout)
#   bench/compare/run.sh --only latency  the latency rows (issue 16: roundtrip, chain, actor call)
#                                        of Flotilla, Dask and Ray, with Flotilla's transport
#                                        floors -> results/latency/{flotilla,dask,ray}.json and
#                                        table.md (also printed)
#   bench/compare/run.sh --only PREFIX   other prefixes: the peers' workloads whose key starts
#                                        with PREFIX -> results/PREFIX/
#   --repeats N   timed runs of each data row (default 3; the 1 GB row runs once)
#   --no-build    (--only data, latency) use the flotilla-bench already built in
#                 ${CARGO_TARGET_DIR:-target}/release instead of running cargo build
#
# Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and Redis on 127.0.0.1:6379
# (override with CELERY_BENCH_BROKER / CELERY_BENCH_BACKEND; Flotilla reads
# FLOTILLA_AMQP_URL / FLOTILLA_REDIS_URL).  Each bench's human-readable table
# goes to stderr; its JSON object goes to the file.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

quick=()
only=""
repeats=()
build=1
out="$here/results"
while (($#)); do
    case "$1" in
        --quick) quick=(--quick); out="$here/results/quick" ;;
        --only)
            [[ $# -ge 2 && -n "$2" ]] || { echo "run.sh: --only needs a key prefix" >&2; exit 2; }
            only="$2"; shift ;;
        --repeats)
            [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --repeats needs a positive number" >&2; exit 2; }
            repeats=(--repeats "$2"); shift ;;
        --no-build) build=0 ;;
        -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "run.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
# The data-plane and latency modes: Flotilla with Dask and Ray, one table.
data=0
table=""
if [[ -n "$only" && "data" == "$only"* || "$only" == data* ]]; then
    data=1
    table=data-table
elif [[ "$only" == latency ]]; then
    data=1
    table=latency-table
fi
filter=()
if [[ -n "$only" ]]; then
    filter=(--only "$only")
    [[ "$only" != latency ]] || filter=(--only "roundtrip,chain,actor,floor")
    out="$here/results/$only"
    [[ ${#quick[@]} -eq 0 ]] || out="$here/results/quick/$only"
fi

"$here/setup.sh"
mkdir -p "$out"
# The peers share 2 cores with whatever else runs: say so when it is not idle.
load1="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    echo "run.sh: warning: 1-min load average is $load1; the machine is not idle, numbers will be noisy" >&2
fi
py="$here/.venv/bin/python"
status=0

# keep FILE NAME: FILE must hold one JSON object; it becomes $out/NAME.json.
keep() {
    local tmp="$1" name="$2" start="$3"
    if "$py" -c 'import json,sys; json.load(open(sys.argv[1]))' "$tmp"; then
        "$py" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])), indent=2))' "$tmp" >"$out/$name.json"
        echo "$name: wrote $out/$name.json ($((SECONDS - start))s)" >&2
    else
        echo "$name: output was not one JSON object" >&2; status=1
    fi
}

peers=(dask celery ray)
if ((data)); then
    peers=(dask ray)
    target="${CARGO_TARGET_DIR:-$root/target}"
    if ((build)); then
        echo "== building flotilla-bench (release) ==" >&2
        (cd "$root" && cargo build --release --locked -p flotilla-bench -p flotilla-cli -p flotilla-examples --bins)
    fi
    bench="$target/release/flotilla-bench"
    [[ -x "$bench" ]] || { echo "run.sh: $bench is missing (build it, or drop --no-build)" >&2; exit 1; }
    flotilla_repeats=("${repeats[@]}")
    if [[ ${#quick[@]} -ne 0 && ${#repeats[@]} -eq 0 ]]; then
        flotilla_repeats=(--repeats 1)  # as the Python benches do under --quick
    fi
    echo "== flotilla ==" >&2
    tmp="$(mktemp "$out/.flotilla.XXXXXX")"
    start=$SECONDS
    # flotilla-bench prints its JSON object as the last line of stdout
    if "$bench" --workers 2 --json "${filter[@]}" "${flotilla_repeats[@]}" | tail -n 1 >"$tmp"; then
        keep "$tmp" flotilla "$start"
    else
        echo "flotilla: benchmark failed" >&2; status=1
    fi
    rm -f "$tmp"
fi

for peer in "${peers[@]}"; do
    echo "== $peer ==" >&2
    tmp="$(mktemp "$out/.$peer.XXXXXX")"
    start=$SECONDS
    if (cd "$here" && "$py" "${peer}_bench.py" "${quick[@]}" "${filter[@]}" "${repeats[@]}" >"$tmp"); then
        keep "$tmp" "$peer" "$start"
    else
        echo "$peer: benchmark failed" >&2; status=1
    fi
    rm -f "$tmp"
done

if ((data)); then
    "$py" "$root/bench/report.py" "$table" "$out/flotilla.json" "$out/dask.json" "$out/ray.json" >"$out/table.md"
    echo "wrote $out/table.md" >&2
    cat "$out/table.md"
fi
exit $status
