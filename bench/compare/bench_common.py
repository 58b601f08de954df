"""Helpers shared by dask_bench.py, celery_bench.py and ray_bench.py (stats, table, JSON)."""

import argparse
import json
import math
import os
import platform
import signal
import statistics
import sys
import time

MB = 1024 * 1024
# The data-plane rows (data_*) count in decimal megabytes, as flotilla-bench
# does: "10 MB" is 10,000,000 bytes, MB/s is 10^6 bytes per second.
DMB = 1_000_000
LOADAVG_AT_START = os.getloadavg()[0]

# Workload sizes: (full run, --quick smoke test)
SIZES = {
    "tasks_10k": (10_000, 1_000),
    "tasks_100k": (100_000, 5_000),
    "chain": (500, 50),
    "roundtrip": (500, 100),
    "actor": (1_000, 100),
    # The data rows keep their sizes under --quick (the keys name them);
    # --quick runs each once and skips the 1 GB row.
    "data_10mb": (10 * DMB, 10 * DMB),
    "data_100mb": (100 * DMB, 100 * DMB),
    "data_1gb": (1000 * DMB, None),
    "data_scatter_tasks": (50, 50),
}
# How many timed runs each workload gets; the median is reported.
REPEATS = {
    "tasks_10k": (3, 2),
    "tasks_100k": (1, 1),  # one run: 100k tasks take minutes on this machine
    "chain": (5, 2),
    # each data row but the 1 GB one (--repeats N overrides; flotilla-bench's
    # default is 3 too)
    "data": (3, 1),
}

DATA_KEYS = [
    "data_result_10mb_mb_per_s",
    "data_result_100mb_mb_per_s",
    "data_scatter_10mb_50_s",
    "data_scatter_100mb_50_s",
    "data_move_100mb_s",
    "data_result_1gb_s",
    "data_result_1gb_client_rss_mb",
    "data_result_1gb_worker_rss_mb",
]

KEYS = [
    "throughput_10k_tasks_per_s",
    "throughput_100k_tasks_per_s",
    "chain_ms_per_task",
    "roundtrip_p50_ms",
    "roundtrip_p99_ms",
    "actor_p50_ms",
    "actor_p99_ms",
    # the data-plane rows (issue 15), same keys and semantics as flotilla-bench
    *DATA_KEYS,
]


def parse_args(description, max_100k_default):
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small counts and fewer repeats (smoke test; numbers not comparable)")
    p.add_argument("--max-100k-seconds", type=float, default=max_100k_default, metavar="S",
                   help="emit null for the 100k workload when the measured 10k rate says it "
                        "would take longer than S seconds (0 = always run it; "
                        f"default {max_100k_default:g})")
    p.add_argument("--only", metavar="PREFIX",
                   help="run only the workloads whose key starts with PREFIX (or any of "
                        "PREFIX,PREFIX,...) "
                        "(--only data: the data-plane rows); the others are left out of the JSON")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="timed runs of each data row, median reported (default 3, 1 with --quick; "
                        "the 1 GB row runs once)")
    args = p.parse_args()
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def skip_100k(n, rate, max_seconds):
    """None to run the 100k workload, else the note explaining why it is skipped."""
    est = n / rate
    if max_seconds and est > max_seconds:
        return f"skipped: {n:,} tasks at the 10k rate would take ~{est:.0f}s > {max_seconds:g}s"
    return None


class Plan:
    def __init__(self, args):
        i = 1 if args.quick else 0
        self.quick = args.quick
        self.only = args.only
        self.size = {k: v[i] for k, v in SIZES.items()}
        self.repeats = {k: v[i] for k, v in REPEATS.items()}
        if args.repeats is not None:
            self.repeats["data"] = args.repeats

    def wanted(self, *keys):
        """Whether any of `keys` is to be run (all of them without --only)."""
        # --only takes prefixes separated by commas.
        return self.only is None or any(k.startswith(p) for k in keys for p in self.only.split(","))

    def keys(self):
        """The keys this run reports, in table order."""
        return [k for k in KEYS if self.wanted(k)]

    def config(self):
        return {"quick": self.quick, "only": self.only, "sizes": self.size,
                "repeats": self.repeats}


def percentile(samples, q):
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(samples)
    k = max(0, math.ceil(q / 100.0 * len(s)) - 1)
    return s[k]


def median(xs):
    return statistics.median(xs)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def install_signal_handlers():
    """Turn SIGTERM/SIGHUP into SystemExit so `finally:` clean-up runs."""
    def _raise(signum, _frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)


def host_info():
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        # 1-min load average when the bench started: > ~0.5 means something
        # else was using the 2 cores and the numbers are not clean
        "loadavg_at_start": round(LOADAVG_AT_START, 2),
    }


def fmt(v):
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def emit(peer, version, config, results, notes, keys=KEYS):
    """Human table to stderr, one JSON object to stdout: `keys` (a value or
    null each), and under "notes" why a value is null or how it was taken."""
    log("")
    log(f"== {peer} {version} ==")
    width = max(len(k) for k in keys)
    for k in keys:
        note = notes.get(k, "")
        log(f"  {k:<{width}}  {fmt(results.get(k)):>14}  {note}")
    out = {"peer": peer, "version": version, "config": config}
    for k in keys:
        out[k] = results.get(k)
    shown = {k: notes[k] for k in keys if k in notes}
    if shown:
        out["notes"] = shown
    print(json.dumps(out, sort_keys=False), flush=True)


def attempt(results, notes, keys, work):
    """Runs one workload: `work()` returns the value of `keys[0]` (or a tuple,
    one value per key). An exception becomes null values and a note
    "error: ...", so one failing row does not end the run."""
    try:
        values = work()
    except Exception as e:  # noqa: BLE001
        message = f"error: {type(e).__name__}: {e}".splitlines()[0][:300]
        log(f"  {keys[0]}: {message}")
        for k in keys:
            results[k] = None
            notes[k] = message
        return
    if len(keys) == 1:
        values = (values,)
    for k, v in zip(keys, values):
        results[k] = v


def reset_peak_rss(pid="self"):
    """Reset the peak RSS (VmHWM) of process `pid` (default: this one) to its
    current RSS, so the next read covers one workload.

    Writing 5 to /proc/<pid>/clear_refs does that (Linux >= 4.0).  Raises
    OSError when it can't: a peak since start would not be the row's."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb(pid="self"):
    """Peak resident set size (VmHWM) of process `pid` in decimal MB (10^6 bytes)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / DMB  # kB -> MB
    raise OSError(f"no VmHWM in /proc/{pid}/status")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t0
        return False
