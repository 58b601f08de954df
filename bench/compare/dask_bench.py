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

from bench_common import (MB, Plan, Timer, emit, host_info, install_signal_handlers,  # noqa: E402
                          log, median, parse_args, peak_rss_mb, percentile, reset_peak_rss,
                          skip_100k)


def main():
    args = parse_args(__doc__, max_100k_default=0)
    plan = Plan(args.quick)
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
    dask.config.set({"temporary-directory": scratch})
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

        # --- scatter N bytes, M tasks read it ---------------------------------
        def scatter(nbytes, ntasks, repeats, key):
            payload = T.blob(nbytes)  # random bytes, made before the clock starts
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
            T._BLOBS.pop(nbytes, None)
            return median(secs)

        results["scatter_10mb_50_tasks_s"] = scatter(
            plan.size["scatter_bytes"], plan.size["scatter_tasks"], plan.repeats["scatter"], "scatter")

        # --- a task's N-byte result to the client ------------------------------
        workers = sorted(client.scheduler_info()["workers"])

        def gather(nbytes, repeats, key):
            # warm the per-worker payload cache on both workers
            client.gather([client.submit(T.blob_len, nbytes, workers=[w], pure=False)
                           for w in workers])
            rates = []
            for r in range(repeats):
                with Timer() as t:
                    data = client.submit(T.blob, nbytes, pure=False).result()
                assert len(data) == nbytes
                del data
                rates.append(nbytes / MB / t.elapsed)
                log(f"  {key} run {r + 1}: {rates[-1]:,.1f} MB/s ({t.elapsed * 1000:.1f} ms)")
            return median(rates)

        results["gather_10mb_mb_per_s"] = gather(
            plan.size["gather_bytes"], plan.repeats["gather"], "gather")

        # --- large values (issue 15) -------------------------------------------
        big = plan.size["large_bytes"]
        results["gather_100mb_mb_per_s"] = gather(big, plan.repeats["large"], "gather 100mb")
        client.run(T.drop_blobs)  # free the workers' caches (memory)
        results["scatter_100mb_50_tasks_s"] = scatter(
            big, plan.size["large_tasks"], plan.repeats["large"], "scatter 100mb")

        # worker -> worker: made on the first worker, consumed on the second
        # (workers= restrictions), so the value crosses the workers' TCP link.
        w1, w2 = workers[0], workers[1]
        client.submit(T.blob_len, big, workers=[w1], pure=False).result()
        secs = []
        for r in range(plan.repeats["large"]):
            with Timer() as t:
                made = client.submit(T.blob, big, r, workers=[w1], pure=False)
                n = client.submit(T.length, made, workers=[w2], pure=False).result()
            assert n == big
            del made
            secs.append(t.elapsed)
            log(f"  worker->worker run {r + 1}: {t.elapsed:.3f} s")
            time.sleep(0.2)  # let the scheduler release both copies
        results["worker_to_worker_100mb_s"] = median(secs)
        client.run(T.drop_blobs)

        # --- 1 GB result to the client (full run only) --------------------------
        huge = plan.size["huge_bytes"]
        if huge is None or not plan.repeats["huge"]:
            for k in ("result_1gb_s", "result_1gb_client_peak_rss_mb"):
                results[k] = None
                notes[k] = "skipped under --quick"
        else:
            # the first worker keeps 1 GB; made before the clock starts
            client.submit(T.blob_len, huge, workers=[w1], pure=False).result()
            reset_peak_rss()
            with Timer() as t:
                data = client.submit(T.blob, huge, workers=[w1], pure=False).result()
            assert len(data) == huge
            del data
            results["result_1gb_s"] = t.elapsed
            results["result_1gb_client_peak_rss_mb"] = peak_rss_mb()
            log(f"  1 GB result: {t.elapsed:.3f} s, client peak RSS "
                f"{results['result_1gb_client_peak_rss_mb']:,.0f} MiB")
            client.run(T.drop_blobs)

        config = {
            "cluster": "LocalCluster(n_workers=2, threads_per_worker=1, processes=True)",
            "dask": dask.__version__,
            "distributed": distributed.__version__,
            "comm_compression": dask.config.get("distributed.comm.compression"),
            "max_100k_seconds": args.max_100k_seconds,
            "worker_saturation": dask.config.get("distributed.scheduler.worker-saturation"),
            "timing": "client-side wall clock (time.perf_counter); median over repeats; "
                      "latency percentiles nearest-rank over all samples",
            "host": host_info(),
            **plan.config(),
        }
        emit("dask", distributed.__version__, config, results, notes)
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
