"""The numba backend's fallback threads for work that calls BLAS: chunks of rows on a Python thread pool.

Used where OpenBLAS's gemm cannot be called from inside numba (_blas.py: NumPy's BLAS is not OpenBLAS with 64-bit
integers): matmul's row chunks then go to this pool, each one NumPy product on its own thread. A pool thread
takes 50-80 us to wake, which _blas.py avoids. Either way the numba backend pins NumPy's OpenBLAS to one thread
(NumbaBackend.__init__, refimpl/blas_threads.py): its own threads spin after each product and took the cores
from numba's threads and the next kernel (the default model's attention took 29 ms of a step with them and
18 ms with OPENBLAS_NUM_THREADS=1).
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
