"""BLAS products called from inside numba kernels, on numba's own threads.

Why: a product cut into one chunk per thread and handed to a Python thread pool (_threads.in_chunks) pays a
thread wake-up of 50-80 us per call; the default model's products take 0.2-1 ms, and a (2048, 128)^T (2048, 128)
product ran no faster on two chunks than on one thread (0.43 ms both, 2026-12-04). A numba parallel region
starts its threads in a few microseconds, so the chunks' BLAS calls are made from inside one (0.24 ms): OpenBLAS's
cblas_sgemm / cblas_dgemm, found in the library NumPy loaded (refimpl/blas_threads.py), which the numba backend
keeps on one thread per call. The function is passed to the kernels as an argument (numba's first-class
functions), so its address is not compiled in and the kernels stay in numba's disk cache.

`gemm(dtype)` is None where NumPy's BLAS is not an OpenBLAS with 64-bit integers (NumPy's wheels since 2.0);
callers then keep the thread-pool path.
"""
import ctypes

import numpy as np
from numba import njit, prange

from refimpl import blas_threads

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112     # CBLAS_ORDER, CBLAS_TRANSPOSE
_gemms = {}


def gemm(dtype):
    """cblas_sgemm (float32) or cblas_dgemm (float64) as a ctypes function numba can call, or None."""
    dtype = np.dtype(dtype)
    if dtype not in _gemms:
        _gemms[dtype] = _find(dtype)
    return _gemms[dtype]


def _find(dtype):
    names = {np.dtype(np.float32): ("cblas_sgemm", ctypes.c_float),
             np.dtype(np.float64): ("cblas_dgemm", ctypes.c_double)}
    if dtype not in names:
        return None
    name, scalar = names[dtype]
    found = blas_threads.symbol(name)
    if found is None or not found[1]:   # 32-bit integers: not worth a second kernel signature
        return None
    # a fresh ctypes function at the same address: the library's own attribute stays as it was
    fn = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_int64, scalar, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                          scalar, ctypes.c_void_p, ctypes.c_int64)(ctypes.cast(found[0], ctypes.c_void_p).value)
    return fn


@njit(parallel=True, nogil=True, cache=True)
def _gemm_rows(gemm, trans_a, a, lda, trans_b, b, ldb, out, N, K, cuts):
    """out (M, N) = op(a) op(b), the output's rows [cuts[c], cuts[c+1]) by thread c. a, b: the flat C-contiguous
    storage of op(a) (M, K) (trans_a: stored as (K, M)) and op(b) (K, N); lda, ldb their row lengths."""
    one, zero = out.dtype.type(1), out.dtype.type(0)
    for c in prange(len(cuts) - 1):
        lo, hi = cuts[c], cuts[c + 1]
        if hi > lo:
            start = lo if trans_a else lo * lda         # row lo of op(a): column lo of the stored (K, M)
            gemm(ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS, hi - lo, N, K, one,
                 a[start:].ctypes, lda, b.ctypes, ldb, zero, out[lo * N:].ctypes, N)


@njit(parallel=True, nogil=True, cache=True)
def _gemm_split_k(gemm, trans_a, a, lda, trans_b, b, ldb, out, parts, cuts):
    """out (M, N) = op(a) op(b) with the shared dimension K cut at `cuts`: thread c multiplies its slice of K into
    parts[c - 1] (thread 0 into out), then the partial products are added into out, rows split among threads.
    Storage as `_gemm_rows`."""
    M, N = out.shape
    one, zero = out.dtype.type(1), out.dtype.type(0)
    for c in prange(len(cuts) - 1):
        lo, hi = cuts[c], cuts[c + 1]
        dst = out if c == 0 else parts[c - 1]
        if hi == lo:
            dst[...] = 0
            continue
        start_a = lo * lda if trans_a else lo           # row lo of op(a)^T: row lo of the stored (K, M)
        start_b = lo if trans_b else lo * ldb           # row lo of op(b): column lo of the stored (N, K)
        gemm(ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS, M, N, hi - lo, one,
             a[start_a:].ctypes, lda, b[start_b:].ctypes, ldb, zero, dst.ctypes, N)
    for r in prange(M):
        for p in range(parts.shape[0]):
            for j in range(N):
                out[r, j] += parts[p, r, j]


def _stored(x):
    """(transposed?, flat C-contiguous storage, row length) of a 2-D operand: itself or its transpose is C-contiguous
    (a copy otherwise)."""
    if not x.flags.c_contiguous and x.T.flags.c_contiguous:
        return True, x.T.reshape(-1), x.shape[0]
    x = np.ascontiguousarray(x)
    return False, x.reshape(-1), x.shape[1]


def split_k_product(x, b, out, cuts):
    """out = x @ b as `rows_product`, the shared dimension cut at `cuts` instead of the output's rows: for
    products whose K is long and whose output is small (a Linear's dW = dY^T X over every token), where each
    thread would otherwise read all of K for a thin slice of the output. (2048, 128)^T (2048, 128): 0.28 ms on
    row chunks, 0.21 ms on K chunks (2026-12-04)."""
    ta, a_flat, lda = _stored(x)
    tb, b_flat, ldb = _stored(b)
    parts = np.empty((len(cuts) - 2, *out.shape), out.dtype)
    _gemm_split_k(gemm(out.dtype), ta, a_flat, lda, tb, b_flat, ldb, out, parts, np.asarray(cuts, np.int64))


def rows_product(x, b, out, cuts):
    """out = x @ b for 2-D float arrays of one dtype with a gemm (all sizes > 0); out C-contiguous (M, N)."""
    ta, a_flat, lda = _stored(x)
    tb, b_flat, ldb = _stored(b)
    _gemm_rows(gemm(out.dtype), ta, a_flat, lda, tb, b_flat, ldb, out.reshape(-1), out.shape[1], x.shape[1],
               np.asarray(cuts, np.int64))
