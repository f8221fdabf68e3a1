"""numba kernels for the dense layers: matmul, softmax, layernorm, GELU, embedding, cross-entropy (fwd and bwd).

Each public function mirrors the reference kernel of the same name in refimpl/kernels/dense.py: same
signature, dtypes in and out, errors. The wrapper does what NumPy does well (upcast float16 / bfloat16 to
float32 and cast the result back, exactly as the reference does; move the reduced axis last) and hands
C-contiguous 1-D or 2-D float32/float64 arrays to a kernel parallel over rows (prange). Inputs the kernels
do not take (a weight that only broadcasts, non-integer ids, ...) go to the reference, which also gives
its errors. Scalar constants are made in the array's dtype (`x.dtype.type(c)`), as NumPy treats Python
floats, so float32 work stays float32.
"""
import math

import numpy as np
from numba import njit, prange

from refimpl.kernels import dense as ref
from refimpl.kernels.dense import compute_dtype

from . import _blas
from ._bits import bits_and_kind
from ._threads import even_cuts, in_chunks
from ._vmath import vexp, vtanh

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_COL_BLOCK = 64  # columns per work item of the column-parallel reductions (race-free: one owner each)
_LN_CHUNKS = 16        # partial sums of layernorm's dweight / dbias: a few per thread, so that load balances
_MATMUL_MIN_ROWS = 64  # fewer output rows than this: one BLAS call on the calling thread
_ADD_MIN = 1 << 16     # elements: below, NumPy's add (starting the threads costs more than they save)


def _up(x):
    """C-contiguous, in the compute dtype (float64 stays, everything else float32), as the reference's _up."""
    return np.ascontiguousarray(x, dtype=compute_dtype(x.dtype))


# ----------------------------------------------------------------------------------------------- matmul
def _rows_product(x, out, b):
    np.matmul(x, b, out=out)


def matmul(a, b, transpose_a=False, transpose_b=False):
    """The reference's matmul (same arguments, dtypes, results) with the output's rows cut into one chunk per
    numba thread, each one BLAS call on its own thread (_blas.py; _threads.py where OpenBLAS's gemm is not found;
    OpenBLAS itself is kept on one thread). A long K with few output rows (a Linear's dW) is cut along K instead.
    Only 2-D products and (..., M, K) @ (K, N) are cut; other batched products go to the reference."""
    a2 = a.swapaxes(-1, -2) if transpose_a else a
    b2 = b.swapaxes(-1, -2) if transpose_b else b
    if b2.ndim != 2 or a2.ndim < 2 or a2.shape[-1] != b2.shape[0] or a2.dtype != b2.dtype \
            or a2.dtype not in (np.float32, np.float64):
        return ref.matmul(a, b, transpose_a, transpose_b)
    x = a2.reshape(-1, a2.shape[-1])                     # (M, K); a view unless a was transposed
    M = x.shape[0]
    if M < _MATMUL_MIN_ROWS:
        return ref.matmul(a, b, transpose_a, transpose_b)
    out = np.empty((M, b2.shape[1]), a2.dtype)
    K = x.shape[1]
    if _blas.gemm(out.dtype) is not None and out.size and K:   # BLAS from numba's threads (_blas.py)
        if K >= 2 * M and K >= 2 * _MATMUL_MIN_ROWS:        # (and each thread's slice of K worth a call)
            _blas.split_k_product(x, b2, out, even_cuts(K))  # long K, small output: a Linear's dW
        else:
            _blas.rows_product(x, b2, out, even_cuts(M))
    else:
        in_chunks(_rows_product, even_cuts(M), (x, out), b2)
    return out.reshape(*a2.shape[:-1], b2.shape[1])


# -------------------------------------------------------------------------------------------------- add
@njit(parallel=True, nogil=True, cache=True)
def _add_rows(a, b, out, cuts):
    """out = a + b for (rows, n) arrays; b (rows, n) or (1, n) (a bias over the last axis)."""
    step = 1 if b.shape[0] > 1 else 0
    for c in prange(len(cuts) - 1):
        for r in range(cuts[c], cuts[c + 1]):
            br = b[r * step]
            for j in range(a.shape[1]):
                out[r, j] = a[r, j] + br[j]


def add(a, b):
    """The reference's add (a + b). C-contiguous float32/float64 operands of one dtype and at least _ADD_MIN
    elements, of one shape or one of them a bias over the last axis (the residual stream, bias adds, gradient
    accumulation), are added on numba's threads: 92 -> 71 us at (16, 128, 128), 456 -> 296 us at (16, 128, 512),
    2026-12-04. The same rounding: one IEEE add per element (and a + b == b + a, bit for bit)."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return ref.add(a, b)
    big, small = (a, b) if a.size >= b.size else (b, a)
    if (big.dtype == small.dtype and big.dtype in (np.float32, np.float64) and big.size >= _ADD_MIN
            and big.ndim >= 1 and (small.shape == big.shape or small.shape == big.shape[-1:])
            and big.flags.c_contiguous and small.flags.c_contiguous):
        rows = _rows(big)
        out = np.empty_like(big)
        _add_rows(rows, small.reshape(-1, rows.shape[1]), _rows(out), np.array(even_cuts(len(rows)), np.int64))
        return out
    return ref.add(a, b)


def _rows(x):
    """(..., n) -> (rows, n) view of a C-contiguous array (size-0 safe)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# ---------------------------------------------------------------------------------------------- softmax
@njit(parallel=True, cache=True)
def _softmax_rows(x):
    out = np.empty_like(x)
    for r in prange(x.shape[0]):
        mx = x[r, 0]
        for j in range(1, x.shape[1]):
            mx = max(mx, x[r, j])
        for j in range(x.shape[1]):                      # no reduction in this loop: it vectorises
            out[r, j] = vexp(x[r, j] - mx)               # the max subtracted: exp never overflows
        s = x.dtype.type(0)
        for j in range(x.shape[1]):
            s += out[r, j]
        for j in range(x.shape[1]):
            out[r, j] = out[r, j] / s
    return out


def softmax(x, axis=-1):
    """Mirrors refimpl.kernels.dense.softmax."""
    xm = _up(np.moveaxis(x, axis, -1))                   # (..., n): the reduced axis last
    if xm.shape[-1] == 0:
        return ref.softmax(x, axis=axis)
    y = _softmax_rows(_rows(xm)).reshape(xm.shape)
    return np.moveaxis(y, -1, axis).astype(x.dtype, copy=False)


@njit(parallel=True, cache=True)
def _softmax_backward_rows(dy, y):
    dx = np.empty_like(dy)
    for r in prange(dy.shape[0]):
        dot = dy.dtype.type(0)
        for j in range(dy.shape[1]):
            dot += dy[r, j] * y[r, j]
        for j in range(dy.shape[1]):
            dx[r, j] = y[r, j] * (dy[r, j] - dot)
    return dx


def softmax_backward(dy, y, axis=-1):
    """Mirrors refimpl.kernels.dense.softmax_backward: dx = y * (dy - sum(dy * y))."""
    if dy.shape != y.shape:
        return ref.softmax_backward(dy, y, axis=axis)
    dt = np.result_type(compute_dtype(dy.dtype), compute_dtype(y.dtype))
    dym, ym = (np.ascontiguousarray(np.moveaxis(a, axis, -1), dtype=dt) for a in (dy, y))
    dx = _softmax_backward_rows(_rows(dym), _rows(ym)).reshape(dym.shape)
    return np.moveaxis(dx, -1, axis).astype(dy.dtype, copy=False)


# -------------------------------------------------------------------------------------------- layernorm
@njit(parallel=True, cache=True)
def _layernorm_rows(x, w, b, eps):
    n = x.shape[1]
    y = np.empty_like(x)
    mean = np.empty(x.shape[0], x.dtype)
    rstd = np.empty(x.shape[0], x.dtype)
    one, n_ = x.dtype.type(1), x.dtype.type(n)             # n in the dtype: float32 / int would be float64
    for r in prange(x.shape[0]):
        s = x.dtype.type(0)
        for j in range(n):
            s += x[r, j]
        mu = s / n_
        ss = x.dtype.type(0)
        for j in range(n):
            ss += (x[r, j] - mu) * (x[r, j] - mu)        # two passes: no E[x^2] - E[x]^2 cancellation
        rs = one / np.sqrt(ss / n_ + eps)
        for j in range(n):
            y[r, j] = (x[r, j] - mu) * rs * w[j] + b[j]
        mean[r], rstd[r] = mu, rs
    return y, mean, rstd


def layernorm(x, weight, bias, eps=1e-5):
    """Mirrors refimpl.kernels.dense.layernorm: returns (y, mean, rstd), mean/rstd (..., 1)."""
    d = x.shape[-1] if x.ndim else -1
    if weight.shape != (d,) or bias.shape != (d,) or d == 0:
        return ref.layernorm(x, weight, bias, eps=eps)
    dt = np.result_type(*(compute_dtype(a.dtype) for a in (x, weight, bias)))
    xc = np.ascontiguousarray(x, dtype=dt)
    y, mean, rstd = _layernorm_rows(_rows(xc), weight.astype(dt), bias.astype(dt), dt.type(eps))
    stat_shape = x.shape[:-1] + (1,)
    return y.reshape(x.shape).astype(x.dtype, copy=False), mean.reshape(stat_shape), rstd.reshape(stat_shape)


@njit(parallel=True, cache=True, error_model="numpy")
def _layernorm_backward_rows(dy, x, w, mean, rstd, chunks):
    """dx row by row; dweight and dbias as one partial sum per chunk of rows (parallel, each chunk's sum a
    vectorised pass over the columns), then the sum of the partials."""
    rows, n = x.shape
    dx = np.empty_like(x)
    n_ = x.dtype.type(n)
    dw_part = np.zeros((chunks, n), x.dtype)
    db_part = np.zeros((chunks, n), x.dtype)
    for c in prange(chunks):
        xhat = np.empty(n, x.dtype)
        dwc, dbc = dw_part[c], db_part[c]
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            xr, dyr, dxr = x[r], dy[r], dx[r]
            mg = x.dtype.type(0)
            mgx = x.dtype.type(0)
            for j in range(n):
                xhat[j] = (xr[j] - mean[r]) * rstd[r]
            for j in range(n):
                g = dyr[j] * w[j]
                mg += g
                mgx += g * xhat[j]
            mg, mgx = mg / n_, mgx / n_
            for j in range(n):                           # these three loops vectorise
                dxr[j] = rstd[r] * (dyr[j] * w[j] - mg - xhat[j] * mgx)
            for j in range(n):
                dwc[j] += dyr[j] * xhat[j]
            for j in range(n):
                dbc[j] += dyr[j]
    dw = np.zeros(n, x.dtype)
    db = np.zeros(n, x.dtype)
    for c in range(chunks):
        for j in range(n):
            dw[j] += dw_part[c, j]
            db[j] += db_part[c, j]
    return dx, dw, db


def layernorm_backward(dy, x, weight, mean, rstd):
    """Mirrors refimpl.kernels.dense.layernorm_backward: returns (dx, dweight, dbias)."""
    d = x.shape[-1] if x.ndim else -1
    stat_shape = x.shape[:-1] + (1,)
    if dy.shape != x.shape or weight.shape != (d,) or mean.shape != stat_shape or rstd.shape != stat_shape:
        return ref.layernorm_backward(dy, x, weight, mean, rstd)
    dt = np.result_type(*(compute_dtype(a.dtype) for a in (dy, x, weight, mean, rstd)))
    dyc, xc = (_rows(np.ascontiguousarray(a, dtype=dt)) for a in (dy, x))
    dx, dw, db = _layernorm_backward_rows(dyc, xc, weight.astype(dt), mean.astype(dt).reshape(-1),
                                          rstd.astype(dt).reshape(-1), max(1, min(len(xc), _LN_CHUNKS)))
    return (dx.reshape(x.shape).astype(x.dtype, copy=False), dw.astype(weight.dtype, copy=False),
            db.astype(weight.dtype, copy=False))


# ------------------------------------------------------------------------------------------------- gelu
@njit(parallel=True, cache=True)
def _gelu_kernel(x):
    f = x.dtype.type
    c, a, half, one = f(_SQRT_2_OVER_PI), f(0.044715), f(0.5), f(1.0)
    y = np.empty_like(x)
    for i in prange(x.size):
        xi = x[i]
        y[i] = half * xi * (one + vtanh(c * (xi + a * (xi * xi * xi))))
    return y


@njit(parallel=True, cache=True)
def _gelu_backward_kernel(dy, x):
    f = x.dtype.type
    c, a, a3, half, one = f(_SQRT_2_OVER_PI), f(0.044715), f(3 * 0.044715), f(0.5), f(1.0)
    dx = np.empty_like(x)
    for i in prange(x.size):
        xi = x[i]
        t = vtanh(c * (xi + a * (xi * xi * xi)))
        dinner = c * (one + a3 * (xi * xi))
        dx[i] = dy[i] * (half * (one + t) + half * xi * (one - t * t) * dinner)
    return dx


def gelu(x):
    """Mirrors refimpl.kernels.dense.gelu (tanh approximation)."""
    return _gelu_kernel(_up(x).reshape(-1)).reshape(x.shape).astype(x.dtype, copy=False)


def gelu_backward(dy, x):
    """Mirrors refimpl.kernels.dense.gelu_backward."""
    if dy.shape != x.shape:
        return ref.gelu_backward(dy, x)
    dt = np.result_type(compute_dtype(dy.dtype), compute_dtype(x.dtype))
    dyc, xc = (np.ascontiguousarray(a, dtype=dt).reshape(-1) for a in (dy, x))
    return _gelu_backward_kernel(dyc, xc).reshape(x.shape).astype(dy.dtype, copy=False)


# -------------------------------------------------------------------------------------------- embedding
def _checked_ids(ids, num_embeddings, kernel):
    """ids as a flat intp array with negatives wrapped (NumPy indexing), or IndexError naming the bad id."""
    flat = np.ascontiguousarray(ids).reshape(-1).astype(np.intp, copy=False)
    if flat.size and (flat.min() < -num_embeddings or flat.max() >= num_embeddings):
        bad = flat[(flat < -num_embeddings) | (flat >= num_embeddings)][0]
        raise IndexError(f"{kernel}: id {bad} is out of range for {num_embeddings} embeddings "
                         f"(allowed: -{num_embeddings} .. {num_embeddings - 1})")
    return np.where(flat < 0, flat + num_embeddings, flat)


@njit(parallel=True, cache=True)
def _gather_rows(weight, ids):
    out = np.empty((ids.size, weight.shape[1]), weight.dtype)
    for n in prange(ids.size):
        for j in range(weight.shape[1]):
            out[n, j] = weight[ids[n], j]
    return out


def embedding(weight, ids):
    """Mirrors refimpl.kernels.dense.embedding: weight (V, D)[ids] -> ids.shape + (D,), weight's dtype."""
    ids = np.asarray(ids)
    if weight.ndim != 2 or ids.dtype.kind not in "iu":
        return ref.embedding(weight, ids)
    flat = _checked_ids(ids, weight.shape[0], "embedding")
    w, _ = bits_and_kind(np.ascontiguousarray(weight))   # a gather copies bits: fp16/bf16 move as uint16
    return _gather_rows(w, flat).view(weight.dtype).reshape(ids.shape + (weight.shape[1],))


@njit(parallel=True, cache=True)
def _scatter_add_rows(dout, ids, num_embeddings):
    """dweight[ids[n]] += dout[n], parallel over blocks of columns: each column has one writer, and each
    sums its rows in index order, the order of np.add.at (so float32 results are the reference's bits)."""
    d = dout.shape[1]
    dweight = np.zeros((num_embeddings, d), dout.dtype)
    for c0 in prange((d + _COL_BLOCK - 1) // _COL_BLOCK):
        for n in range(ids.size):
            for j in range(c0 * _COL_BLOCK, min(d, (c0 + 1) * _COL_BLOCK)):
                dweight[ids[n], j] += dout[n, j]
    return dweight


def embedding_backward(dout, ids, num_embeddings):
    """Mirrors refimpl.kernels.dense.embedding_backward: race-free scatter-add, dout's dtype."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu" or dout.ndim < 1 or ids.shape != dout.shape[:-1]:
        return ref.embedding_backward(dout, ids, num_embeddings)
    flat = _checked_ids(ids, num_embeddings, "embedding_backward")
    dweight = _scatter_add_rows(_rows(_up(dout)), flat, int(num_embeddings))
    return dweight.astype(dout.dtype, copy=False)


# ---------------------------------------------------------------------------------------- cross-entropy
def _checked_targets(targets, n_classes, ignore_index):
    """(targets as intp with negatives wrapped, valid mask, count) or IndexError naming the bad target."""
    t = np.ascontiguousarray(targets).astype(np.intp, copy=False)  # the callers checked: integers
    valid = t != ignore_index
    bad = valid & ((t < -n_classes) | (t >= n_classes))
    if bad.any():
        raise IndexError(f"cross_entropy: target {t[bad][0]} is out of range for {n_classes} classes "
                         f"(allowed: 0 .. {n_classes - 1}, or ignore_index={ignore_index})")
    return np.where(valid & (t < 0), t + n_classes, t), valid, max(int(valid.sum()), 1)


def _kernel_takes(logits, targets):
    """logits (N, C) and integer targets (N,); anything else goes to the reference (and its errors)."""
    targets = np.asarray(targets)
    return logits.ndim == 2 and targets.dtype.kind in "iu" and targets.shape == logits.shape[:1]


@njit(parallel=True, cache=True)
def _cross_entropy_rows(z, t, valid):
    lse = np.empty(z.shape[0], z.dtype)
    nll = np.zeros(z.shape[0], z.dtype)
    for r in prange(z.shape[0]):
        mx = z[r, 0]
        for j in range(1, z.shape[1]):
            mx = max(mx, z[r, j])
        e = np.empty(z.shape[1], z.dtype)
        for j in range(z.shape[1]):                      # no reduction in this loop: it vectorises
            e[j] = vexp(z[r, j] - mx)
        s = z.dtype.type(0)
        for j in range(z.shape[1]):
            s += e[j]
        lse[r] = mx + np.log(s)
        if valid[r]:
            nll[r] = lse[r] - z[r, t[r]]
    return lse, nll


def cross_entropy(logits, targets, ignore_index=-100):
    """Mirrors refimpl.kernels.dense.cross_entropy: (mean NLL over non-ignored rows as a 0-d array, lse)."""
    if not _kernel_takes(logits, targets) or logits.shape[1] == 0:
        return ref.cross_entropy(logits, targets, ignore_index=ignore_index)
    t, valid, count = _checked_targets(targets, logits.shape[1], ignore_index)
    z = _up(logits)
    lse, nll = _cross_entropy_rows(z, t, valid)
    return np.asarray(nll.sum() / count, dtype=z.dtype), lse   # NumPy's pairwise sum, as the reference


@njit(parallel=True, cache=True)
def _cross_entropy_backward_rows(z, t, valid, lse, coef):
    dz = np.zeros_like(z)                                # ignored rows: exactly 0
    one = z.dtype.type(1)
    for r in prange(z.shape[0]):
        if valid[r]:
            for j in range(z.shape[1]):
                p = vexp(z[r, j] - lse[r])               # softmax from the saved lse
                if j == t[r]:
                    p = p - one
                dz[r, j] = np.float64(p) * coef          # the reference scales in float64 too
    return dz


def cross_entropy_backward(dloss, logits, targets, lse, ignore_index=-100):
    """Mirrors refimpl.kernels.dense.cross_entropy_backward: (softmax - onehot) * dloss / count."""
    if not _kernel_takes(logits, targets) or lse.shape != logits.shape[:1]:
        return ref.cross_entropy_backward(dloss, logits, targets, lse, ignore_index=ignore_index)
    t, valid, count = _checked_targets(targets, logits.shape[1], ignore_index)
    z = _up(logits)
    dz = _cross_entropy_backward_rows(z, t, valid, np.ascontiguousarray(lse, dtype=z.dtype),
                                      float(dloss) / count)
    return dz.astype(logits.dtype, copy=False)
