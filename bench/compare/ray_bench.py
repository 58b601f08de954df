#!/usr/bin/env python3
"""Ray side of the Flotilla comparison benchmark.

A local Ray cluster started by this script: ray.init(num_cpus=2), so 2 worker
slots (tasks take 1 CPU each), no dashboard, object store capped at 2 GiB,
all session files under a temporary directory that is removed at exit.
Prints a table to stderr and one JSON object to stdout.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_common import (DMB, Plan, Timer, attempt, emit, host_info,  # noqa: E402
                          install_signal_handlers, log, median, parse_args, peak_rss_mb,
                          percentile, reset_peak_rss, skip_100k)

NUM_CPUS = 2
OBJECT_STORE_BYTES = 2 * 1024 * 1024 * 1024  # room for the 1 GB result (sealed once in the store)

# Before `import ray`: no usage-stats reporting over the network, and no token
# authentication (Ray 2.60 otherwise writes ~/.ray/auth_token, a file outside
# bench/compare; the cluster only listens on this machine).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Workers import ray_tasks by name: make sure they can find it.
os.environ["PYTHONPATH"] = HERE + (os.pathsep + os.environ["PYTHONPATH"]
                                   if os.environ.get("PYTHONPATH") else "")


def _processes():
    """{pid: (ppid, args)} of every process, from ps."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    procs = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            procs[int(parts[0])] = (int(parts[1]), parts[2] if len(parts) > 2 else "")
    return procs


def ray_processes(temp_dir):
    """{pid: args} of the processes of this run's Ray cluster: every descendant
    of this process, plus anything whose command line names the temp dir (Ray's
    daemons do; its agents and workers rename themselves `ray::...`, so they
    are found as descendants)."""
    procs = _processes()
    me = os.getpid()
    found = {pid: args for pid, (_, args) in procs.items() if temp_dir in args and pid != me}
    frontier = [me] + list(found)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, args) in procs.items():
            if ppid == parent and pid not in found and not args.startswith("ps "):
                found[pid] = args
                frontier.append(pid)
    return found


def still_running(known):
    """The processes of `known` ({pid: args}) that are still alive (and are not zombies)."""
    procs = _processes()
    alive = {}
    for pid, args in known.items():
        if pid in procs and procs[pid][1] == args:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
            except OSError:
                continue
            alive[pid] = args
    return alive


def data_rows(ray, T, plan, results, notes, blob, length, Holder, warm_both, drop_blobs):
    """The data-plane rows (issue 15), with the keys and semantics of
    flotilla-bench's data_* rows."""
    repeats = plan.repeats["data"]

    def drop_all():
        # empty the task workers' payload caches (memory)
        for _ in range(5):
            if len(set(ray.get([drop_blobs.remote() for _ in range(2 * NUM_CPUS)]))) >= NUM_CPUS:
                return

    def result(nbytes, key):
        warm_both(nbytes)  # every task worker's payload cache filled before the clock
        secs = []
        for r in range(repeats):
            with Timer() as t:
                data = ray.get(blob.remote(nbytes, r))
            assert len(data) == nbytes
            del data
            secs.append(t.elapsed)
            log(f"  {key} run {r + 1}: {nbytes / DMB / t.elapsed:,.1f} MB/s ({t.elapsed:.3f} s)")
        drop_all()
        return nbytes / DMB / median(secs)

    def scatter(nbytes, key):
        payload = T.random_bytes(nbytes)  # made before the clock starts
        ntasks = plan.size["data_scatter_tasks"]
        secs = []
        for r in range(repeats):
            with Timer() as t:
                ref = ray.put(payload)
                out = ray.get([length.remote(ref) for _ in range(ntasks)])
            assert out == [nbytes] * ntasks
            del ref, out
            secs.append(t.elapsed)
            log(f"  {key} run {r + 1}: {t.elapsed:.3f} s")
        return median(secs)

    for key, size in (("data_result_10mb_mb_per_s", "data_10mb"),
                      ("data_result_100mb_mb_per_s", "data_100mb")):
        if plan.wanted(key):
            attempt(results, notes, [key], lambda: result(plan.size[size], key))
    for key, size in (("data_scatter_10mb_50_s", "data_10mb"),
                      ("data_scatter_100mb_50_s", "data_100mb")):
        if plan.wanted(key):
            attempt(results, notes, [key], lambda: scatter(plan.size[size], key))

    huge_keys = ["data_result_1gb_s", "data_result_1gb_client_rss_mb",
                 "data_result_1gb_worker_rss_mb"]
    if not plan.wanted("data_move_100mb_s", *huge_keys):
        return
    # Ray places tasks on nodes, not on worker processes, and this cluster is
    # one node: two num_cpus=1 actors are two worker processes, so a value is
    # made in one and used in the other (through the node's shared-memory
    # object store). They take both CPUs: made after the task rows above.
    a, b = Holder.remote(), Holder.remote()
    try:
        assert ray.get(a.pid.remote()) != ray.get(b.pid.remote())

        def move(nbytes, key):
            ray.get(a.warm.remote(nbytes))
            ray.get(b.consume.remote(a.make.remote(nbytes)))  # untimed: warms both paths
            secs = []
            for r in range(repeats):
                with Timer() as t:
                    n = ray.get(b.consume.remote(a.make.remote(nbytes, r)))
                assert n == nbytes
                secs.append(t.elapsed)
                log(f"  {key} run {r + 1}: {t.elapsed:.3f} s")
            ray.get(a.drop.remote())
            return median(secs)

        def huge(nbytes):
            # actor a makes and keeps the value before the clock starts; the
            # peaks of the client and of a are reset just before
            ray.get(a.warm.remote(nbytes))
            reset_peak_rss()
            ray.get(a.reset_peak.remote())
            with Timer() as t:
                data = ray.get(a.make.remote(nbytes))
            assert len(data) == nbytes
            client_peak = peak_rss_mb()
            del data
            worker_peak = ray.get(a.peak_rss_mb.remote())
            ray.get(a.drop.remote())
            log(f"  1 GB result: {t.elapsed:.3f} s, peak RSS client {client_peak:,.0f} MB, "
                f"worker {worker_peak:,.0f} MB")
            return t.elapsed, client_peak, worker_peak

        if plan.wanted("data_move_100mb_s"):
            attempt(results, notes, ["data_move_100mb_s"],
                    lambda: move(plan.size["data_100mb"], "data_move_100mb_s"))
        if plan.wanted(*huge_keys):
            if plan.size["data_1gb"] is None:
                for k in huge_keys:
                    results[k] = None
                    notes[k] = "skipped under --quick"
            else:
                attempt(results, notes, huge_keys, lambda: huge(plan.size["data_1gb"]))
    finally:
        ray.kill(a)
        ray.kill(b)


def main():
    args = parse_args(__doc__, max_100k_default=0)
    plan = Plan(args)
    install_signal_handlers()

    import ray

    import ray_tasks as T

    results, notes = {}, {}
    # Ray's default is /tmp/ray; keep the session (logs, sockets, spill files)
    # in a directory of our own.  Short path: Ray's unix sockets live in it.
    temp_dir = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    started = False
    try:
        t0 = time.perf_counter()
        ray.init(
            num_cpus=NUM_CPUS,
            num_gpus=0,
            object_store_memory=OBJECT_STORE_BYTES,
            include_dashboard=False,
            _temp_dir=temp_dir,
            logging_level="WARNING",
            log_to_driver=False,
        )
        started = True
        log(f"ray: cluster up in {time.perf_counter() - t0:.1f}s "
            f"({ray.cluster_resources().get('CPU', 0):g} CPUs, temp dir {temp_dir})")

        inc = ray.remote(T.inc)
        length = ray.remote(T.length)
        blob = ray.remote(T.blob)
        warm_blob = ray.remote(T.warm_blob)
        drop_blobs = ray.remote(T.drop_blobs)
        Counter = ray.remote(T.Counter)
        Holder = ray.remote(num_cpus=1)(T.Holder)

        def warm_both(nbytes):
            """Fill the payload cache in every task worker process (at least 2)."""
            for _ in range(5):
                pids = {p for p, _ in ray.get([warm_blob.remote(nbytes) for _ in range(2 * NUM_CPUS)])}
                if len(pids) >= NUM_CPUS:
                    return
            log(f"  warning: payload cache warm in only {len(pids)} worker process(es)")

        # Warm-up: start both task workers, import ray_tasks there.
        ray.get([inc.remote(i) for i in range(200)])
        warm_both(1)

        # --- throughput ---------------------------------------------------
        if plan.wanted("throughput_10k_tasks_per_s", "throughput_100k_tasks_per_s"):
            def throughput(n, repeats, key):
                rates = []
                for r in range(repeats):
                    with Timer() as t:
                        refs = [inc.remote(i) for i in range(n)]
                        out = ray.get(refs)
                    assert out[-1] == n, out[-1]
                    del refs, out
                    rates.append(n / t.elapsed)
                    log(f"  {key} run {r + 1}/{repeats}: {n / t.elapsed:,.0f} tasks/s ({t.elapsed:.2f}s)")
                return median(rates)

            n10 = plan.size["tasks_10k"]
            rate10 = throughput(n10, plan.repeats["tasks_10k"], "10k")
            results["throughput_10k_tasks_per_s"] = rate10
            n100 = plan.size["tasks_100k"]
            why = skip_100k(n100, rate10, args.max_100k_seconds)
            if why:
                results["throughput_100k_tasks_per_s"] = None
                notes["throughput_100k_tasks_per_s"] = why
                log(f"  100k: {why}")
            else:
                results["throughput_100k_tasks_per_s"] = throughput(n100, plan.repeats["tasks_100k"], "100k")

        # --- dependency chain ----------------------------------------------
        if plan.wanted("chain_ms_per_task"):
            n_chain = plan.size["chain"]
            f = inc.remote(0)  # untimed warm-up chain, as in the other benches
            for _ in range(19):
                f = inc.remote(f)
            ray.get(f)
            per_task = []
            for r in range(plan.repeats["chain"]):
                with Timer() as t:
                    f = inc.remote(0)
                    for _ in range(n_chain - 1):
                        f = inc.remote(f)  # an ObjectRef argument: runs when the previous one is done
                    v = ray.get(f)
                assert v == n_chain, v
                del f
                per_task.append(t.elapsed * 1000 / n_chain)
                log(f"  chain run {r + 1}: {per_task[-1]:.3f} ms/task")
            results["chain_ms_per_task"] = median(per_task)

        # --- sequential round trip ------------------------------------------
        if plan.wanted("roundtrip_p50_ms", "roundtrip_p99_ms"):
            lat = []
            for i in range(plan.size["roundtrip"]):
                with Timer() as t:
                    v = ray.get(inc.remote(i))
                assert v == i + 1
                lat.append(t.elapsed * 1000)
            results["roundtrip_p50_ms"] = percentile(lat, 50)
            results["roundtrip_p99_ms"] = percentile(lat, 99)
            log(f"  roundtrip: p50 {percentile(lat, 50):.3f} ms, p99 {percentile(lat, 99):.3f} ms")

        # --- actor calls ----------------------------------------------------
        if plan.wanted("actor_p50_ms", "actor_p99_ms"):
            counter = Counter.remote()
            for _ in range(20):  # warm-up (also waits for the actor's process)
                ray.get(counter.incr.remote())
            lat = []
            for _ in range(plan.size["actor"]):
                with Timer() as t:
                    ray.get(counter.incr.remote())
                lat.append(t.elapsed * 1000)
            ray.kill(counter)
            del counter
            results["actor_p50_ms"] = percentile(lat, 50)
            results["actor_p99_ms"] = percentile(lat, 99)
            log(f"  actor: p50 {percentile(lat, 50):.3f} ms, p99 {percentile(lat, 99):.3f} ms")

        # --- the data-plane rows (issue 15) -----------------------------------
        data_rows(ray, T, plan, results, notes, blob, length, Holder, warm_both, drop_blobs)

        config = {
            "cluster": f"ray.init(num_cpus={NUM_CPUS}, object_store_memory={OBJECT_STORE_BYTES}, "
                       "include_dashboard=False): local head node, 2 task worker slots",
            "ray": ray.__version__,
            "object_store_memory": OBJECT_STORE_BYTES,
            "actors": "ray.remote(Counter) for actor calls; two ray.remote(num_cpus=1) Holder actors "
                      "(two worker processes) for worker->worker and the 1 GB result",
            "max_100k_seconds": args.max_100k_seconds,
            "timing": "client-side wall clock (time.perf_counter); median over repeats; "
                      "latency percentiles nearest-rank over all samples",
            "host": host_info(),
            **plan.config(),
        }
        emit("ray", ray.__version__, config, results, notes, plan.keys())
        return 0
    finally:
        # Everything Ray started, seen before it is asked to stop.
        ours = ray_processes(temp_dir)
        if started:
            try:
                ray.shutdown()
            except Exception as e:  # noqa: BLE001
                log(f"ray: shutdown failed: {e!r}")
        # ray.shutdown() stops the processes it started; check, and stop stragglers.
        ours.update(ray_processes(temp_dir))
        left = still_running(ours)
        for _ in range(20):
            if not left:
                break
            time.sleep(0.5)
            left = still_running(ours)
        for pid, args in left.items():
            log(f"ray: killing leftover process {pid}: {args[:120]}")
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
