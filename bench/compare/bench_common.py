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
    # large values (issue 15): the "100 MB" rows use 10 MiB under --quick;
    # the 1 GB row is skipped (null) under --quick
    "large_bytes": (100 * MB, 10 * MB),
    "large_tasks": (50, 10),
    "huge_bytes": (1024 * MB, None),
}
# How many timed runs each workload gets; the median is reported.
REPEATS = {
    "tasks_10k": (3, 2),
    "tasks_100k": (1, 1),  # one run: 100k tasks take minutes on this machine
    "chain": (5, 2),
    "scatter": (5, 2),
    "gather": (7, 2),
    "large": (3, 1),  # each 100 MB row
    "huge": (1, 0),   # the 1 GB result: once, full run only
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
    # large values (issue 15)
    "gather_100mb_mb_per_s",
    "scatter_100mb_50_tasks_s",
    "worker_to_worker_100mb_s",
    "result_1gb_s",
    "result_1gb_client_peak_rss_mb",
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


def reset_peak_rss():
    """Reset this process's peak RSS (VmHWM) so the next read covers one workload.

    Writing 5 to /proc/self/clear_refs does that (Linux >= 4.0).  Returns False
    when it can't, in which case peak_rss_mb() is the peak since start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    """Peak resident set size of this process (VmHWM) in MiB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return None


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t0
        return False
