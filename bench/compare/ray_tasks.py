"""Functions and actor classes the Ray workers run (imported by reference,
like dask_tasks.py is for Dask).  ray_bench.py wraps them with ray.remote."""

import os
import random
import time

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
    # Per-process cache of random payloads: the large-value workloads measure
    # moving the bytes, not generating them.  `nonce` only makes calls distinct.
    data = _BLOBS.get(nbytes)
    if data is None:
        data = random_bytes(nbytes)
        _BLOBS[nbytes] = data
    return data


def warm_blob(nbytes, linger=0.3):
    """Fill this worker's cache; return (pid, len) so the client sees which
    worker processes are warm.  `linger` keeps the slot busy a moment so that
    concurrent warm-up calls land on different worker processes."""
    n = len(blob(nbytes))
    time.sleep(linger)
    return os.getpid(), n


def drop_blobs(linger=0.3):
    """Empty this worker's cache; return its pid (see warm_blob for `linger`)."""
    _BLOBS.clear()
    time.sleep(linger)
    return os.getpid()


class Counter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n


class Holder:
    """One worker process that makes, keeps, serves or consumes a large value
    (worker -> worker and 1 GB rows: Ray places tasks on nodes, not on worker
    processes, so a pinned worker is an actor)."""

    def pid(self):
        return os.getpid()

    def warm(self, nbytes):
        return len(blob(nbytes))

    def make(self, nbytes, nonce=None):
        return blob(nbytes)

    def consume(self, b):
        return len(b)

    def drop(self):
        _BLOBS.clear()
        return True

    def reset_peak(self):
        """Reset this process's peak RSS (VmHWM), for a row's own peak."""
        from bench_common import reset_peak_rss
        reset_peak_rss()
        return True

    def peak_rss_mb(self):
        """This process's peak RSS (VmHWM) since reset_peak, in MB (10^6 bytes)."""
        from bench_common import peak_rss_mb
        return peak_rss_mb()
