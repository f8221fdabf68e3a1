"""The numba backend's own threads for work that calls BLAS: chunks of rows on a thread pool, BLAS on one thread each.

Why: NumPy's OpenBLAS starts its own threads for every product above 2^18 multiply-adds, and they spin for a
while after each call. On a 2-core machine those spinning threads took the cores from numba's threads and from
the next kernel: the default model's attention took 29 ms of a step with them and 18 ms with
OPENBLAS_NUM_THREADS=1. So the products of attention and matmul are cut into one chunk of rows per numba thread
(`in_chunks`), and the numba backend pins OpenBLAS to one thread when it starts (NumbaBackend.__init__,
refimpl/blas_threads.py): one pool of threads does all the parallel work. This holds for the whole process,
NumPy code outside refimpl included. When NumPy's BLAS is not OpenBLAS (or its thread control is not found),
nothing changes and the chunks still run in parallel.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import get_num_threads

_pool, _pool_size, _pool_lock = None, 0, threading.Lock()


def in_chunks(fn, cuts, arrays, *args):
    """fn(*(a[lo:hi] for a in arrays), *args) for each run [lo, hi) between consecutive `cuts`: the calling
    thread takes the first run, a thread pool the others; returns when all are done (and raises their errors)."""
    global _pool, _pool_size
    jobs = [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]
    others = []
    if len(jobs) > 1:
        with _pool_lock:
            if _pool_size < len(jobs) - 1:
                _pool, _pool_size = ThreadPoolExecutor(len(jobs) - 1, thread_name_prefix="refimpl-numba"), len(jobs) - 1
            pool = _pool
        others = [pool.submit(fn, *(a[lo:hi] for a in arrays), *args) for lo, hi in jobs[1:]]
    try:
        lo, hi = jobs[0]
        fn(*(a[lo:hi] for a in arrays), *args)
    finally:
        for f in others:
            f.result()


def even_cuts(n, parts=None):
    """Cut n rows into `parts` (default: numba's thread count) runs of nearly equal length."""
    parts = max(1, min(parts or get_num_threads(), n))
    return [int(c) for c in np.linspace(0, n, parts + 1)]
