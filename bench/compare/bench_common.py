"""Helpers shared by dask_bench.py and celery_bench.py (stats, table, JSON)."""

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
LOADAVG_AT_START = os.getloadavg()[0]

# Workload sizes: (full run, --quick smoke test)
SIZES = {
    "tasks_10k": (10_000, 1_000),
    "tasks_100k": (100_000, 5_000),
    "chain": (500, 50),
    "roundtrip": (500, 100),
    "actor": (1_000, 100),
    "scatter_bytes": (10 * MB, 1 * MB),
    "scatter_tasks": (50, 10),
    "gather_bytes": (10 * MB, 1 * MB),
}
# How many timed runs each workload gets; the median is reported.
REPEATS = {
    "tasks_10k": (3, 2),
    "tasks_100k": (1, 1),  # one run: 100k tasks take minutes on this machine
    "chain": (5, 2),
    "scatter": (5, 2),
    "gather": (7, 2),
}

KEYS = [
    "throughput_10k_tasks_per_s",
    "throughput_100k_tasks_per_s",
    "chain_ms_per_task",
    "roundtrip_p50_ms",
    "roundtrip_p99_ms",
    "actor_p50_ms",
    "actor_p99_ms",
    "scatter_10mb_50_tasks_s",
    "gather_10mb_mb_per_s",
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
    return p.parse_args()


def skip_100k(n, rate, max_seconds):
    """None to run the 100k workload, else the note explaining why it is skipped."""
    est = n / rate
    if max_seconds and est > max_seconds:
        return f"skipped: {n:,} tasks at the 10k rate would take ~{est:.0f}s > {max_seconds:g}s"
    return None


class Plan:
    def __init__(self, quick):
        i = 1 if quick else 0
        self.quick = quick
        self.size = {k: v[i] for k, v in SIZES.items()}
        self.repeats = {k: v[i] for k, v in REPEATS.items()}

    def config(self):
        return {"quick": self.quick, "sizes": self.size, "repeats": self.repeats}


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


def emit(peer, version, config, results, notes):
    """Human table to stderr, one JSON object to stdout."""
    log("")
    log(f"== {peer} {version} ==")
    width = max(len(k) for k in KEYS)
    for k in KEYS:
        note = notes.get(k, "")
        log(f"  {k:<{width}}  {fmt(results.get(k)):>14}  {note}")
    out = {"peer": peer, "version": version, "config": config}
    for k in KEYS:
        out[k] = results.get(k)
    print(json.dumps(out, sort_keys=False), flush=True)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t0
        return False
