"""The machine's memory read bandwidth, for the decode bound.

Every core reads its share of an array far larger than the caches (numpy's `max`, which reads
each byte once and keeps nothing); the best of several passes counts. Copying would count the
write too, and one core alone does not saturate the memory system.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np


def read_bandwidth(gib: float = 2.0, passes: int = 5, threads: int | None = None) -> float:
    """Bytes per second, best of `passes`."""
    threads = threads or os.cpu_count() or 1
    array = np.ones(int(gib * 2**30) // 8)
    shares = np.array_split(array, threads)
    best = float("inf")
    for _ in range(passes):
        workers = [threading.Thread(target=share.max) for share in shares]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - started)
    return array.nbytes / best
