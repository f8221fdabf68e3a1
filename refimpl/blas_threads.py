"""NumPy's BLAS thread count, read and set while the process runs (OpenBLAS, as NumPy's wheels ship it).

Why refimpl touches it: OpenBLAS starts its own threads for every product above 2^18 multiply-adds, and they spin
for a while after each one. Simulated ranks are threads of one process, so N ranks calling BLAS at once start N
times OpenBLAS's threads on the same cores, and the spinning ones take the cores from the ranks that compute.
The default run (4 ranks on 2 cores) took 86.8 s with them and 49.1 s with one BLAS thread, with bitwise the same
losses and checkpoint (2026-12-04). So `train` gives each simulated rank an equal share of the cores
(`limited`), and the numba backend, which runs its BLAS calls on its own threads, pins one thread for the process
(`pin_threads`).

OPENBLAS_NUM_THREADS only counts when NumPy loads, so this goes through OpenBLAS's own
`openblas_set_num_threads` (found in the loaded library, the way threadpoolctl finds it). Where NumPy's BLAS is
not OpenBLAS, or the functions are not found, everything here does nothing. `symbol` hands out other functions of
that library (the numba backend calls its gemm from inside its kernels: backends/refimpl_numba/_blas.py).
"""
import contextlib
import ctypes
import os
import threading

_lock = threading.Lock()
_found, _api = False, None
_pinned = False              # set by pin_threads: `limited` then leaves the count alone on leaving


def _openblas():
    """(get, set) of the thread count of the OpenBLAS that NumPy loaded, or None."""
    lib = _library()
    return None if lib is None else lib[1]


def _library():
    """(the OpenBLAS that NumPy loaded, (get, set) of its thread count, its symbol name format), or None."""
    global _found, _api
    with _lock:
        if not _found:
            _api, _found = _search(), True
        return _api


def _search():
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
        for prefix in ("scipy_", ""):               # NumPy's wheels: scipy_openblas_set_num_threads64_
            for suffix in ("64_", "", "_64"):
                get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    return lib, (get, set_), prefix + "{}" + suffix
    return None


def symbol(name: str):
    """(OpenBLAS's function `name`, e.g. "cblas_sgemm", as a ctypes function without argtypes, and whether its
    integers are 64-bit), from the library NumPy loaded and with its symbol names (NumPy's wheels:
    scipy_cblas_sgemm64_, 64-bit integers); None where NumPy's BLAS is not OpenBLAS or lacks it."""
    lib = _library()
    if lib is None:
        return None
    fn = getattr(lib[0], lib[2].format(name), None)
    return None if fn is None else (fn, "64" in lib[2])


def get_threads() -> "int | None":
    """NumPy's OpenBLAS thread count, or None where it cannot be read."""
    api = _openblas()
    return None if api is None else api[0]()


def set_threads(n: int) -> bool:
    """Set NumPy's OpenBLAS thread count to n (>= 1); returns whether it could."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"a BLAS thread count must be an int >= 1, got {n!r}")
    api = _openblas()
    if api is None:
        return False
    api[1](n)
    return api[0]() == n


def pin_threads(n: int) -> bool:
    """set_threads(n) for the rest of the process: a `limited` block that ends later does not undo it (the numba
    backend, which runs BLAS on its own threads, pins 1)."""
    global _pinned
    _pinned = set_threads(n)
    return _pinned


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def limited(n: int):
    """Inside: at most n OpenBLAS threads (never raised); the earlier count comes back on leaving."""
    before = get_threads()
    changed = before is not None and before > n and set_threads(n)
    try:
        yield
    finally:
        if changed and not _pinned:
            set_threads(before)
