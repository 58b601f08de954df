"""Celery app and tasks for the Flotilla comparison benchmark.

Imported both by the benchmark client (celery_bench.py) and by the worker
processes it starts (`celery -A celery_tasks worker ...`).  Broker and result
backend come from the environment so the client and its workers always agree:

    CELERY_BENCH_BROKER   default amqp://guest:guest@127.0.0.1:5672//
    CELERY_BENCH_BACKEND  default redis://127.0.0.1:6379/1
    CELERY_BENCH_QUEUE    queue name (celery_bench.py sets a unique one per run)
"""

import os
import random

from celery import Celery
from kombu import Exchange, Queue

BROKER_URL = os.environ.get("CELERY_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND_URL = os.environ.get("CELERY_BENCH_BACKEND", "redis://127.0.0.1:6379/1")
QUEUE = os.environ.get("CELERY_BENCH_QUEUE", "flotilla-bench")
# RabbitMQ drops the queue (and so its exchange, auto_delete) once it has had
# no consumer for 60 s, so even a run killed with SIGKILL leaves nothing behind.
QUEUE_EXPIRES_MS = 60_000

app = Celery("celery_tasks", broker=BROKER_URL, backend=BACKEND_URL)
app.conf.update(
    # pickle so that the 10 MB workload can return raw bytes (JSON cannot
    # carry arbitrary bytes); it is also the closest match to Dask's wire
    # format.  For the tiny int tasks it makes no measurable difference.
    task_serializer="pickle",
    result_serializer="pickle",
    accept_content=["pickle", "json"],
    # result keys in Redis go away by themselves after the run
    result_expires=600,
    # the benchmark measures the default delivery semantics: early ack,
    # default prefetch multiplier (4), no events
    worker_send_task_events=False,
    task_send_sent_event=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_queues=[
        Queue(QUEUE, Exchange(QUEUE, type="direct", auto_delete=True), routing_key=QUEUE,
              queue_arguments={"x-expires": QUEUE_EXPIRES_MS}),
    ],
    task_default_queue=QUEUE,
    task_create_missing_queues=False,
)

# Per-process cache of random payloads, so the 10 MB workload measures moving
# the bytes, not generating them (random, so no layer can compress them).
_BLOBS = {}


def _blob(nbytes):
    data = _BLOBS.get(nbytes)
    if data is None:
        data = random.Random(nbytes).randbytes(nbytes)
        _BLOBS[nbytes] = data
    return data


@app.task(name="bench.inc")
def inc(x):
    return x + 1


@app.task(name="bench.blob")
def blob(nbytes):
    return _blob(nbytes)


@app.task(name="bench.blob_len")
def blob_len(nbytes):
    # fills this pool process's cache without sending the bytes anywhere
    return len(_blob(nbytes))


@app.task(name="bench.drop_blobs")
def drop_blobs():
    _BLOBS.clear()
    return True
