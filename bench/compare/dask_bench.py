#!/usr/bin/env python3
"""Dask distributed side of the Flotilla comparison benchmark.

LocalCluster with 2 worker processes x 1 thread (nannies, spawn), no
dashboard.  Prints a table to stderr and one JSON object to stdout.
"""

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (DMB, Plan, Timer, attempt, emit, host_info,  # noqa: E402
                          install_signal_handlers, log, median, parse_args, peak_rss_mb,
                          percentile, reset_peak_rss, skip_100k)

# A 1 GB value takes seconds to cross one connection: Dask's defaults (30 s)
# are for small messages.
COMM_TIMEOUTS = {"distributed.comm.timeouts.connect": "120s",
                 "distributed.comm.timeouts.tcp": "600s"}


def data_rows(client, T, plan, results, notes):
    """The data-plane rows (issue 15), with the keys and semantics of
    flotilla-bench's data_* rows."""
    repeats = plan.repeats["data"]
    workers = sorted(client.scheduler_info()["workers"])
    w1, w2 = workers[0], workers[1]

    def result(nbytes, key):
        # every worker's payload cache filled before the clock starts
        client.gather([client.submit(T.blob_len, nbytes, workers=[w], pure=False)
                       for w in workers])
        secs = []
        for r in range(repeats):
            with Timer() as t:
                data = client.submit(T.blob, nbytes, r, pure=False).result()
            assert len(data) == nbytes
            del data
            secs.append(t.elapsed)
            log(f"  {key} run {r + 1}: {nbytes / DMB / t.elapsed:,.1f} MB/s ({t.elapsed:.3f} s)")
        client.run(T.drop_blobs)
        return nbytes / DMB / median(secs)

    def scatter(nbytes, key):
        payload = T.random_bytes(nbytes)  # made before the clock starts
        ntasks = plan.size["data_scatter_tasks"]
        secs = []
        for r in range(repeats):
            with Timer() as t:
                ref = client.scatter(payload, hash=False)
                futs = [client.submit(T.length, ref, pure=False) for _ in range(ntasks)]
                out = client.gather(futs)
            assert out == [nbytes] * ntasks
            del ref, futs, out
            secs.append(t.elapsed)
            log(f"  {key} run {r + 1}: {t.elapsed:.3f} s")
            time.sleep(0.2)  # let the scheduler release the previous copy
        return median(secs)

    def move(nbytes, key):
        # made on the first worker, the input of a task on the second
        # (workers= restrictions): the value crosses the workers' TCP link
        client.submit(T.blob_len, nbytes, workers=[w1], pure=False).result()
        secs = []
        for r in range(repeats):
            with Timer() as t:
                made = client.submit(T.blob, nbytes, r, workers=[w1], pure=False)
                n = client.submit(T.length, made, workers=[w2], pure=False).result()
            assert n == nbytes
            del made
            secs.append(t.elapsed)
            log(f"  {key} run {r + 1}: {t.elapsed:.3f} s")
            time.sleep(0.2)  # let the scheduler release both copies
        client.run(T.drop_blobs)
        return median(secs)

    def huge(nbytes):
        # the first worker makes and keeps the value before the clock starts;
        # the peaks of the client and the workers are reset just before
        client.submit(T.blob_len, nbytes, workers=[w1], pure=False).result()
        reset_peak_rss()
        client.run(reset_peak_rss)
        with Timer() as t:
            data = client.submit(T.blob, nbytes, workers=[w1], pure=False).result()
        assert len(data) == nbytes
        client_peak = peak_rss_mb()
        del data
        worker_peak = max(client.run(peak_rss_mb).values())
        client.run(T.drop_blobs)
        log(f"  1 GB result: {t.elapsed:.3f} s, peak RSS client {client_peak:,.0f} MB, "
            f"worker {worker_peak:,.0f} MB")
        return t.elapsed, client_peak, worker_peak

    for key, size in (("data_result_10mb_mb_per_s", "data_10mb"),
                      ("data_result_100mb_mb_per_s", "data_100mb")):
        if plan.wanted(key):
            attempt(results, notes, [key], lambda: result(plan.size[size], key))
    for key, size in (("data_scatter_10mb_50_s", "data_10mb"),
                      ("data_scatter_100mb_50_s", "data_100mb")):
        if plan.wanted(key):
            attempt(results, notes, [key], lambda: scatter(plan.size[size], key))
    if plan.wanted("data_move_100mb_s"):
        attempt(results, notes, ["data_move_100mb_s"],
                lambda: move(plan.size["data_100mb"], "data_move_100mb_s"))
    keys = ["data_result_1gb_s", "data_result_1gb_client_rss_mb", "data_result_1gb_worker_rss_mb"]
    if plan.wanted(*keys):
        if plan.size["data_1gb"] is None:
            for k in keys:
                results[k] = None
                notes[k] = "skipped under --quick"
        else:
            attempt(results, notes, keys, lambda: huge(plan.size["data_1gb"]))


def main():
    args = parse_args(__doc__, max_100k_default=0)
    plan = Plan(args)
    install_signal_handlers()

    import dask
    import distributed
    from distributed import Client, LocalCluster

    import dask_tasks as T

    results, notes = {}, {}
    cluster = client = None
    # Dask's scratch directory (scheduler and workers) defaults to
    # $TMPDIR/dask-scratch-space, which it leaves behind; use a directory of
    # our own and remove it at the end.
    scratch = tempfile.mkdtemp(prefix="dask-bench-")
    dask.config.set({"temporary-directory": scratch, **COMM_TIMEOUTS})
    try:
        t0 = time.perf_counter()
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",  # no fixed port (bokeh is not installed anyway)
            host="127.0.0.1",
            silence_logs=50,  # logging.CRITICAL: keep shutdown noise out of the table
            local_directory=scratch,
        )
        client = Client(cluster)
        client.wait_for_workers(2, timeout=60)
        log(f"dask: cluster up in {time.perf_counter() - t0:.1f}s "
            f"({len(client.scheduler_info()['workers'])} workers)")

        # Warm-up: import dask_tasks on both workers, open all connections.
        client.gather(client.map(T.inc, range(200), pure=False))
        client.run(lambda: None)

        # --- throughput ---------------------------------------------------
        if plan.wanted("throughput_10k_tasks_per_s", "throughput_100k_tasks_per_s"):
            def throughput(n, repeats, key):
                rates = []
                for r in range(repeats):
                    with Timer() as t:
                        futs = client.map(T.inc, range(n), pure=False)
                        out = client.gather(futs)
                    assert out[-1] == n, out[-1]
                    del futs, out
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
            # untimed warm-up chain, as in celery_bench.py
            f = client.submit(T.inc, 0, pure=False)
            for _ in range(19):
                f = client.submit(T.inc, f, pure=False)
            f.result()
            del f
            per_task = []
            for r in range(plan.repeats["chain"]):
                with Timer() as t:
                    f = client.submit(T.inc, 0, pure=False)
                    for _ in range(n_chain - 1):
                        f = client.submit(T.inc, f, pure=False)
                    v = f.result()
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
                    v = client.submit(T.inc, i, pure=False).result()
                assert v == i + 1
                lat.append(t.elapsed * 1000)
            results["roundtrip_p50_ms"] = percentile(lat, 50)
            results["roundtrip_p99_ms"] = percentile(lat, 99)
            log(f"  roundtrip: p50 {percentile(lat, 50):.3f} ms, p99 {percentile(lat, 99):.3f} ms")

        # --- actor calls ----------------------------------------------------
        if plan.wanted("actor_p50_ms", "actor_p99_ms"):
            counter = client.submit(T.Counter, actor=True).result()
            for _ in range(20):  # warm-up
                counter.incr().result()
            lat = []
            for _ in range(plan.size["actor"]):
                with Timer() as t:
                    counter.incr().result()
                lat.append(t.elapsed * 1000)
            del counter
            results["actor_p50_ms"] = percentile(lat, 50)
            results["actor_p99_ms"] = percentile(lat, 99)
            log(f"  actor: p50 {percentile(lat, 50):.3f} ms, p99 {percentile(lat, 99):.3f} ms")

        # --- the data-plane rows (issue 15) -----------------------------------
        data_rows(client, T, plan, results, notes)

        config = {
            "cluster": "LocalCluster(n_workers=2, threads_per_worker=1, processes=True)",
            "dask": dask.__version__,
            "distributed": distributed.__version__,
            "comm_compression": dask.config.get("distributed.comm.compression"),
            "comm_timeouts": COMM_TIMEOUTS,
            "max_100k_seconds": args.max_100k_seconds,
            "worker_saturation": dask.config.get("distributed.scheduler.worker-saturation"),
            "timing": "client-side wall clock (time.perf_counter); median over repeats; "
                      "latency percentiles nearest-rank over all samples",
            "host": host_info(),
            **plan.config(),
        }
        emit("dask", distributed.__version__, config, results, notes, plan.keys())
        return 0
    finally:
        if client is not None:
            try:
                client.close(timeout=20)
            except Exception as e:  # noqa: BLE001
                log(f"dask: client.close failed: {e!r}")
        if cluster is not None:
            try:
                cluster.close(timeout=30)
            except Exception as e:  # noqa: BLE001
                log(f"dask: cluster.close failed: {e!r}")
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
