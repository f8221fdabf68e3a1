"""Keep freed host memory in the process: glibc's malloc thresholds, set once (`keep_freed`).

Why refimpl touches them: a training step allocates and frees tens to hundreds of MB of NumPy temporaries
(activations, gradients, products, the plain attention's scores), from several threads (numba's, the simulated
ranks). glibc serves large arrays with fresh pages (mmap) and gives the free top of its heaps back to the kernel,
so every step faulted its temporaries in again. The default model's step (2 cores, 2026-12-04):

    backend   page faults per step   kernel time per step   step
    numba     4,600-5,000 -> 1       8-11 ms -> 1 ms        56 -> 50 ms
    numpy     17,000 -> 1            23 ms -> 0.4 ms        126 -> 102 ms

with arrays up to 16 MiB taken from the heap and up to 256 MiB of free heap top kept for reuse (with 64 MiB the
numpy step still faulted 7,700 times). The values are glibc's environment knobs MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_, set while the process runs (mallopt); a value the user gave in the environment wins.
With another C library nothing happens. Memory is only kept for reuse: numerics are unchanged.
"""
import ctypes
import os
import threading

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc's malloc.h
MMAP_THRESHOLD = 16 << 20    # bytes: smaller arrays come from the heap (glibc's own limit would be 32 MiB)
TRIM_THRESHOLD = 256 << 20   # bytes of free heap top kept before giving memory back

_lock = threading.Lock()
_done = None


def keep_freed() -> bool:
    """Set the thresholds above for the process (once); returns whether glibc took them."""
    global _done
    with _lock:
        if _done is None:
            _done = _set()
        return _done


def _set() -> bool:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):   # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    for env, param, value in (("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                              ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if env not in os.environ:
            ok = mallopt(param, value) == 1 and ok
    return ok
