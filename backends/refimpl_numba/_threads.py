"""The numba backend's own threads for work that calls BLAS: chunks of rows on a thread pool, BLAS on one thread each.

Why: NumPy's OpenBLAS starts its own threads for every product above 2^18 multiply-adds, and they spin for a
while after each call. On a 2-core machine those spinning threads took the cores from numba's threads and from
the next kernel: the default model's attention took 29 ms of a step with them and 18 ms with
OPENBLAS_NUM_THREADS=1. So the products of attention and matmul are cut into one chunk of rows per numba thread
(`in_chunks`), and the numba backend sets OpenBLAS to one thread when it starts (`make_blas_serial`): one pool of
threads does all the parallel work. This holds for the whole process, NumPy code outside refimpl included. When
NumPy's BLAS is not OpenBLAS (or its thread control is not found), nothing changes and the chunks still run in
parallel.
"""
import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import get_num_threads

_pool, _pool_lock = None, threading.Lock()


def in_chunks(fn, cuts, arrays, *args):
    """fn(*(a[lo:hi] for a in arrays), *args) for each run [lo, hi) between consecutive `cuts`: the calling
    thread takes the first run, a thread pool the others; returns when all are done (and raises their errors)."""
    global _pool
    jobs = [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]
    others = []
    if len(jobs) > 1:
        with _pool_lock:
            if _pool is None or _pool._max_workers < len(jobs) - 1:
                _pool = ThreadPoolExecutor(len(jobs) - 1, thread_name_prefix="refimpl-numba")
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


# ------------------------------------------------------------------------------------ OpenBLAS threads
def _find_openblas():
    """(get, set) of the thread count of the OpenBLAS that NumPy loaded, or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("", "64_", "_64"):    # NumPy's wheels: scipy_openblas_set_num_threads64_
            for prefix in ("", "scipy_"):
                get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    return get, set_
    return None


_blas_serial = None


def make_blas_serial():
    """Set NumPy's OpenBLAS to one thread for the rest of the process, once; returns whether it could.
    Not per call: setting the count back up wakes OpenBLAS's threads, and they spin again."""
    global _blas_serial
    if _blas_serial is None:
        blas = _find_openblas()
        if blas is not None:
            blas[1](1)
        _blas_serial = blas is not None and blas[0]() == 1
    return _blas_serial
