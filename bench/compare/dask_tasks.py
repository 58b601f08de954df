"""Functions and the actor class the Dask workers run (imported by reference,
like celery_tasks.py is for Celery)."""

import random

_BLOBS = {}
_CHUNK = 64 * 1024 * 1024


def random_bytes(nbytes):
    """Deterministic random bytes; in 64 MiB pieces (randbytes can't make 1 GB)."""
    if nbytes <= _CHUNK:
        return random.Random(nbytes).randbytes(nbytes)
    rng = random.Random(nbytes)
    return b"".join(rng.randbytes(min(_CHUNK, nbytes - i)) for i in range(0, nbytes, _CHUNK))


def inc(x):
    return x + 1


def length(b):
    return len(b)


def blob(nbytes, nonce=None):
    # Per-process cache of random payloads: the 10 MB workload measures moving
    # the bytes, not generating them.  `nonce` only makes each call a new task.
    data = _BLOBS.get(nbytes)
    if data is None:
        data = random_bytes(nbytes)
        _BLOBS[nbytes] = data
    return data


def blob_len(nbytes):
    """Fill this worker's payload cache without sending the bytes anywhere."""
    return len(blob(nbytes))


def drop_blobs():
    _BLOBS.clear()
    return True


class Counter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n
