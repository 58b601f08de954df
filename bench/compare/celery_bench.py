#!/usr/bin/env python3
"""Celery side of the Flotilla comparison benchmark.

Broker: RabbitMQ (amqp://guest:guest@127.0.0.1:5672//), result backend: Redis
(redis://127.0.0.1:6379/1); override with CELERY_BENCH_BROKER /
CELERY_BENCH_BACKEND.  Starts one Celery worker node with the prefork pool and
concurrency 2 (= 2 prefork worker processes) consuming a queue whose name is
unique to this run, so leftovers from other runs cannot interfere.  The worker
is stopped and the queue purged and deleted at the end, also on error (and the
queue has x-expires=60s, so even a SIGKILLed run leaves nothing behind).

Prints a table to stderr and one JSON object to stdout.
"""

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_common import (DMB, Plan, Timer, attempt, emit, host_info, install_signal_handlers,  # noqa: E402
                          log, median, parse_args, percentile, skip_100k)

CONCURRENCY = 2
GET_TIMEOUT = 600


def _die_with_parent():
    """preexec_fn: the worker gets SIGTERM if this script dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class CeleryWorker:
    """`celery -A celery_tasks worker --pool=prefork -c 2 -Q <queue>` as a child."""

    def __init__(self, queue, node):
        self.queue = queue
        self.node = node
        self.proc = None
        self.logfile = tempfile.NamedTemporaryFile(
            prefix="celery-bench-worker-", suffix=".log", delete=False)

    def start(self):
        env = dict(os.environ)
        if os.geteuid() == 0:
            # Celery refuses to run a pickle-accepting worker as root without this.
            env["C_FORCE_ROOT"] = "1"
        cmd = [
            sys.executable, "-m", "celery", "-A", "celery_tasks", "worker",
            "--pool=prefork", "-c", str(CONCURRENCY),
            "-Q", self.queue, "-n", self.node,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel=WARNING",
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL,
            stdout=self.logfile, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we can stop all of it
            preexec_fn=_die_with_parent,
        )

    def stop(self):
        if self.proc is None:
            return
        pgid = self.proc.pid  # session leader: pgid == pid
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)  # warm shutdown of the whole group
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log("celery: worker did not stop in 20s, killing it")
        # whatever is left of the group (pool children) goes now
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.logfile.close()

    def tail(self, n=40):
        try:
            with open(self.logfile.name, "r", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def main():
    args = parse_args(__doc__, max_100k_default=90.0)
    plan = Plan(args)
    install_signal_handlers()

    import billiard
    import celery
    import kombu
    import redis
    from celery import chain
    from celery.result import ResultSet

    uid = uuid.uuid4().hex[:12]
    queue = f"flotilla-bench-{uid}"
    os.environ["CELERY_BENCH_QUEUE"] = queue  # read by celery_tasks here and in the worker
    import celery_tasks as T

    app = T.app
    assert T.QUEUE == queue
    worker = CeleryWorker(queue, f"bench-{uid}@%h")
    results, notes = {}, {}
    ok = False

    def send(task, *a):
        return task.apply_async(a, queue=queue)

    try:
        t0 = time.perf_counter()
        worker.start()
        # Ready = it answers a task (first delivery waits for the worker to boot).
        deadline = time.monotonic() + 90
        while True:
            if worker.proc.poll() is not None:
                raise RuntimeError("celery worker exited at start-up:\n" + worker.tail())
            try:
                send(T.inc, 0).get(timeout=5)
                break
            except celery.exceptions.TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError("celery worker not ready after 90s:\n" + worker.tail())
        log(f"celery: worker up in {time.perf_counter() - t0:.1f}s (queue {queue})")
        # Warm-up: both pool processes, all connections.
        ResultSet([send(T.inc, i) for i in range(200)]).get(timeout=GET_TIMEOUT)

        # --- throughput ---------------------------------------------------
        if plan.wanted("throughput_10k_tasks_per_s", "throughput_100k_tasks_per_s"):
            def throughput(n, repeats, key):
                rates = []
                for r in range(repeats):
                    with Timer() as t:
                        rs = ResultSet([send(T.inc, i) for i in range(n)])
                        out = rs.get(timeout=GET_TIMEOUT)
                    assert out[-1] == n, out[-1]
                    del rs, out
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
            # untimed warm-up chain (the first chain after the big fan-outs is an outlier)
            chain(T.inc.s(0).set(queue=queue), *[T.inc.s().set(queue=queue) for _ in range(19)]
                  ).apply_async().get(timeout=GET_TIMEOUT)
            per_task = []
            for r in range(plan.repeats["chain"]):
                with Timer() as t:
                    sigs = [T.inc.s(0).set(queue=queue)]
                    sigs += [T.inc.s().set(queue=queue) for _ in range(n_chain - 1)]
                    v = chain(*sigs).apply_async().get(timeout=GET_TIMEOUT)
                assert v == n_chain, v
                per_task.append(t.elapsed * 1000 / n_chain)
                log(f"  chain run {r + 1}: {per_task[-1]:.3f} ms/task")
            results["chain_ms_per_task"] = median(per_task)

        # --- sequential round trip ------------------------------------------
        if plan.wanted("roundtrip_p50_ms", "roundtrip_p99_ms"):
            lat = []
            for i in range(plan.size["roundtrip"]):
                with Timer() as t:
                    v = send(T.inc, i).get(timeout=GET_TIMEOUT)
                assert v == i + 1
                lat.append(t.elapsed * 1000)
            results["roundtrip_p50_ms"] = percentile(lat, 50)
            results["roundtrip_p99_ms"] = percentile(lat, 99)
            log(f"  roundtrip: p50 {percentile(lat, 50):.3f} ms, p99 {percentile(lat, 99):.3f} ms")

        # --- no counterpart in Celery ----------------------------------------
        for k in ("actor_p50_ms", "actor_p99_ms"):
            results[k] = None
            notes[k] = "n/a: Celery has no actors"

        # --- the data-plane rows (issue 15) -----------------------------------
        def result(nbytes, key):
            # warm the per-process payload cache in both pool processes
            ResultSet([send(T.blob_len, nbytes) for _ in range(4 * CONCURRENCY)]).get(timeout=GET_TIMEOUT)
            secs = []
            for r in range(plan.repeats["data"]):
                with Timer() as t:
                    res = send(T.blob, nbytes)
                    data = res.get(timeout=GET_TIMEOUT)
                assert len(data) == nbytes
                del data
                res.forget()  # drop the value from Redis now
                secs.append(t.elapsed)
                log(f"  {key} run {r + 1}: {nbytes / DMB / t.elapsed:,.1f} MB/s ({t.elapsed:.3f} s)")
            ResultSet([send(T.drop_blobs) for _ in range(4 * CONCURRENCY)]).get(timeout=GET_TIMEOUT)
            return nbytes / DMB / median(secs)

        for key, size in (("data_result_10mb_mb_per_s", "data_10mb"),
                          ("data_result_100mb_mb_per_s", "data_100mb")):
            if plan.wanted(key):
                attempt(results, notes, [key], lambda: result(plan.size[size], key))
        for key, why in (("data_scatter_10mb_50_s", "n/a: Celery has no scatter / shared objects"),
                         ("data_scatter_100mb_50_s", "n/a: Celery has no scatter / shared objects"),
                         ("data_move_100mb_s", "n/a: a task can't be pinned to one pool process"),
                         ("data_result_1gb_s", "n/a: one Redis value is at most 512 MB"),
                         ("data_result_1gb_client_rss_mb", "n/a: one Redis value is at most 512 MB"),
                         ("data_result_1gb_worker_rss_mb", "n/a: one Redis value is at most 512 MB")):
            results[key] = None
            notes[key] = why

        config = {
            "workers": f"1 worker node, --pool=prefork -c {CONCURRENCY} (2 prefork worker processes)",
            "broker": T.BROKER_URL.replace("guest:guest@", "***@"),
            "result_backend": T.BACKEND_URL,
            "serializer": app.conf.task_serializer,
            "prefetch_multiplier": app.conf.worker_prefetch_multiplier,
            "acks_late": app.conf.task_acks_late,
            "celery": celery.__version__,
            "kombu": kombu.__version__,
            "billiard": billiard.__version__,
            "redis_py": redis.__version__,
            "submit": "task.apply_async in a loop; results via ResultSet.get (redis pub/sub)",
            "chain": "celery.chain of inc signatures, one apply_async",
            "max_100k_seconds": args.max_100k_seconds,
            "timing": "client-side wall clock (time.perf_counter); median over repeats; "
                      "latency percentiles nearest-rank over all samples",
            "host": host_info(),
            **plan.config(),
        }
        emit("celery", celery.__version__, config, results, notes, plan.keys())
        ok = True
        return 0
    finally:
        worker.stop()
        try:
            with app.connection_for_write() as conn:
                ch = conn.default_channel
                try:
                    purged = ch.queue_purge(queue)
                    if purged:
                        log(f"celery: purged {purged} leftover messages")
                except Exception:  # noqa: BLE001  (queue may not exist)
                    ch = conn.channel()
                for op in (lambda c: c.queue_delete(queue), lambda c: c.exchange_delete(queue)):
                    try:
                        op(ch)
                    except Exception:  # noqa: BLE001
                        ch = conn.channel()
        except Exception as e:  # noqa: BLE001
            log(f"celery: could not clean up queue {queue}: {e!r}")
        try:
            app.close()
        except Exception:  # noqa: BLE001
            pass
        if ok:
            try:
                os.unlink(worker.logfile.name)
            except OSError:
                pass
        else:
            log(f"celery: worker log kept at {worker.logfile.name}")


if __name__ == "__main__":
    sys.exit(main())
