"""Functions and the actor class the Dask workers run (imported by reference,
like celery_tasks.py is for Celery)."""

import random

_BLOBS = {}


def inc(x):
    return x + 1


def length(b):
    return len(b)


def blob(nbytes, nonce=None):
    # Per-process cache of random payloads: the 10 MB workload measures moving
    # the bytes, not generating them.  `nonce` only makes each call a new task.
    data = _BLOBS.get(nbytes)
    if data is None:
        data = random.Random(nbytes).randbytes(nbytes)
        _BLOBS[nbytes] = data
    return data


class Counter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n
