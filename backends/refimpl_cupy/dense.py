"""Dense-layer kernels on the GPU: same signatures, dtypes and semantics as refimpl/kernels/dense.py.

matmul goes to cuBLAS: float32/float64 through cupy.matmul (TF32 stays off: CuPy uses it only when
CUPY_TF32=1), float16/bfloat16 through cublasGemmStridedBatchedEx with fp32 accumulation
(CUBLAS_COMPUTE_32F) and one rounding of the result. The rest are the fused kernels of _source.py.
"""
import functools
import math

import numpy as np

from . import _runtime as rt
from ._runtime import cupy, raw, scalar


# ----------------------------------------------------------------------------------------------- matmul
_ONE = np.ones(1, np.float32)    # host scalars cuBLAS reads through a pointer (alpha, beta)
_ZERO = np.zeros(1, np.float32)
_ONE_PTR, _ZERO_PTR = _ONE.ctypes.data, _ZERO.ctypes.data


def matmul(a, b, transpose_a=False, transpose_b=False):
    """Batched op(a) @ op(b) over the last two dims, batch dims broadcast; fp32 accumulation."""
    cp = cupy()
    out_dtype = np.result_type(a.dtype, b.dtype)
    if a.dtype == b.dtype and a.dtype in (np.dtype(np.float16), rt.bfloat16):
        return _gemm_lowp(a, b, transpose_a, transpose_b)
    cdt = rt.compute_dtype(out_dtype)
    a_op = rt.up(a).astype(cdt, copy=False)
    b_op = rt.up(b).astype(cdt, copy=False)
    if transpose_a:
        a_op = a_op.swapaxes(-1, -2)
    if transpose_b:
        b_op = b_op.swapaxes(-1, -2)
    y = cp.matmul(a_op, b_op)
    return y if y.dtype == out_dtype else rt.cast(y, out_dtype)


def _gemm_lowp(a, b, ta, tb):
    """fp16/bf16 GEMM in cuBLAS with fp32 accumulation. Row-major C = op(A) op(B) is column-major
    C^T = op(B)^T op(A)^T, so B goes first; a contiguous row-major X is X^T to column-major cuBLAS.
    (Shapes are Python ints and math.prod, not numpy: this runs ~300 times a GPT-2 step, on the host.)"""
    dtype = a.dtype
    M, K = (a.shape[-1], a.shape[-2]) if ta else (a.shape[-2], a.shape[-1])
    Kb, N = (b.shape[-1], b.shape[-2]) if tb else (b.shape[-2], b.shape[-1])
    if K != Kb:
        raise ValueError(f"matmul: inner dimensions differ: op(a) is {M}x{K}, op(b) is {Kb}x{N} "
                         f"(shapes {a.shape}, {b.shape}, transpose_a={ta}, transpose_b={tb})")
    if b.ndim == 2 and a.ndim > 2 and not ta:
        # (..., M, K) @ (K, N) is one (prod(...) * M, K) GEMM
        y = _gemm_lowp(rt.contiguous(a).reshape(-1, K), b, False, tb)
        return y.reshape(*a.shape[:-1], N)
    batch = () if a.ndim == b.ndim == 2 else tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    if math.prod(batch) * M * N == 0:
        return rt.empty(batch + (M, N), dtype)
    if K == 0:
        return rt.zeros(batch + (M, N), dtype)
    if not batch:
        return _gemm_2d(a, b, ta, tb, M, N, K)
    (a_c, stride_a), (b_c, stride_b) = _operand(a, batch), _operand(b, batch)
    out = rt.empty(batch + (M, N), dtype)
    _cublas_gemm(dtype, tb, ta, N, M, K, b_c, b.shape[-1], stride_b, a_c, a.shape[-1], stride_a, out, N,
                 math.prod(batch))
    return out


def _padded(n):
    return -(-n // 8) * 8


def _gemm_2d(a, b, ta, tb, M, N, K):
    """One GEMM on operands whose rows are 16-byte aligned and whose K and N are multiples of 8, padded with zeros
    where they are not: only then does cuBLAS run its vectorised kernels. GPT-2's vocab (50257) sent the LM head's
    three GEMMs to align1 kernels, ~6x slower (H200, benchmarks/gpu.py step --trace). Zeros along K add nothing;
    the output's padded columns are cut off."""
    N8, K8 = _padded(N), _padded(K)
    # a: (M, K), or (K, M) when ta; b: (K, N), or (N, K) when tb. Rows padded where they run along K or N.
    a_p = _pad2d(a, K8 if ta else a.shape[0])
    b_p = _pad2d(b, N8 if tb else K8)
    out = rt.empty((M, N8), a.dtype)
    _cublas_gemm(a.dtype, tb, ta, N8, M, K8, b_p, b_p.shape[1], 0, a_p, a_p.shape[1], 0, out, N8, 1)
    return out if N8 == N else _pad2d(out[:, :N], M, N)


def _pad2d(x, rows, cols=None):
    """x (2-D, any strides) in a new C-contiguous (rows, cols) array, zeros beyond x; cols defaults to x's row
    length rounded up to 8. x itself when it already is that array, 16-byte aligned."""
    cols = _padded(x.shape[1]) if cols is None else cols
    if x.shape == (rows, cols) and x.flags.c_contiguous and x.data.ptr % 16 == 0:
        return x
    out = rt.empty((rows, cols), x.dtype)
    sr, sc = (st // x.itemsize for st in x.strides)
    rt.kernel("pad2d_u16")((min(-(-cols // rt.THREADS), 1024), min(rows, rt.MAX_BLOCKS)), (rt.THREADS,),
                           (raw(x), scalar(x.shape[0], np.int64), scalar(x.shape[1], np.int64), scalar(sr, np.int64),
                            scalar(sc, np.int64), raw(out), scalar(rows, np.int64), scalar(cols, np.int64)))
    return out


def _operand(x, batch):
    """A batched operand: contiguous, broadcast to the batch, with its batch stride (0 when x has one matrix)."""
    if x.ndim == 2 or math.prod(x.shape[:-2]) == 1:
        return rt.contiguous(x), 0
    cp = cupy()
    return cp.ascontiguousarray(cp.broadcast_to(raw(x), batch + x.shape[-2:])), x.shape[-2] * x.shape[-1]


@functools.lru_cache(maxsize=None)
def _cublas():
    """cuBLAS's constants, looked up once: the 16-bit type codes, fp32 compute, the default algorithm."""
    from cupy.cuda import cublas, runtime
    return (cublas, {np.dtype(np.float16): runtime.CUDA_R_16F, rt.bfloat16: getattr(runtime, "CUDA_R_16BF", 14)},
            getattr(cublas, "CUBLAS_COMPUTE_32F", 68), getattr(cublas, "CUBLAS_GEMM_DEFAULT", -1))


def _cublas_gemm(dtype, tb, ta, N, M, K, b_c, ldb, stride_b, a_c, lda, stride_a, out, ldc, nbatch):
    """One cublasGemmStridedBatchedEx on the current stream: C (N x M, column-major) = op(B) op(A)."""
    cp = cupy()
    cublas, codes, compute, algo = _cublas()
    code = codes[dtype]
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
    cublas.gemmStridedBatchedEx(
        handle, 1 if tb else 0, 1 if ta else 0, N, M, K,
        _ONE_PTR, b_c.data.ptr, code, ldb, stride_b,
        a_c.data.ptr, code, lda, stride_a,
        _ZERO_PTR, out.data.ptr, code, ldc, M * ldc, nbatch, compute, algo)


# ------------------------------------------------------------------------------------------------ rows
def _rows(x, axis=-1):
    """x with `axis` moved last, contiguous, as (rows, D), plus how to put a result back."""
    cp = cupy()
    axis = axis % x.ndim if x.ndim else 0
    moved = x if axis == x.ndim - 1 else cp.moveaxis(raw(x), axis, -1).view(x.dtype)
    moved = rt.contiguous(moved)
    d = moved.shape[-1] if moved.ndim else 1
    shape = moved.shape

    def back(y):
        y = y.reshape(shape)
        if axis == x.ndim - 1:
            return y
        return rt.contiguous(cp.moveaxis(raw(y), -1, axis).view(y.dtype))
    return moved, moved.size // max(d, 1), d, back


def softmax(x, axis=-1):
    xr, rows, d, back = _rows(x, axis)
    y = rt.empty(xr.shape, x.dtype)
    rt.launch_rows(f"softmax_fwd<{rt.ctype(x.dtype)}>", rows, d, raw(xr), raw(y), scalar(rows, np.int64),
                   scalar(d, np.int32))
    return back(y)


def softmax_backward(dy, y, axis=-1):
    y = y if y.dtype == dy.dtype else rt.cast(y, dy.dtype)
    dyr, rows, d, back = _rows(dy, axis)
    yr = _rows(y, axis)[0]
    dx = rt.empty(dyr.shape, dy.dtype)
    rt.launch_rows(f"softmax_bwd<{rt.ctype(dy.dtype)}>", rows, d, raw(dyr), raw(yr), raw(dx),
                   scalar(rows, np.int64), scalar(d, np.int32))
    return back(dx)


def _ln_weight(w, x_dtype, cdt, as_stored=True):
    """A layernorm weight/bias as the kernels read it, and its C++ type: as stored when it has x's dtype (no
    copy, converted in registers), else upcast to the compute dtype."""
    if as_stored and w.dtype == x_dtype:
        return raw(rt.contiguous(w)), rt.ctype(x_dtype)
    return rt.contiguous(rt.up(w).astype(cdt, copy=False)), rt.ctype(cdt)


def layernorm(x, weight, bias, eps=1e-5):
    """Returns (y, mean, rstd); mean/rstd (..., 1) in the compute dtype."""
    cdt = rt.compute_dtype(x.dtype)
    xr = rt.contiguous(x)
    d = x.shape[-1]
    rows = xr.size // d
    y = rt.empty(x.shape, x.dtype)
    mean, rstd = rt.empty(x.shape[:-1] + (1,), cdt), rt.empty(x.shape[:-1] + (1,), cdt)
    (w, wt), (b, bt) = _ln_weight(weight, x.dtype, cdt), _ln_weight(bias, x.dtype, cdt)
    if wt != bt:   # one weight type per kernel: both in the compute dtype
        (w, wt), (b, bt) = (_ln_weight(a, x.dtype, cdt, as_stored=False) for a in (weight, bias))
    rt.launch_rows(f"layernorm_fwd<{rt.ctype(x.dtype)}, {wt}>", rows, d, raw(xr), w, b, raw(y), mean, rstd,
                   scalar(rows, np.int64), scalar(d, np.int32), scalar(eps, cdt))
    return y, mean, rstd


def layernorm_backward(dy, x, weight, mean, rstd):
    """Returns (dx, dweight, dbias): dx in x's dtype, dweight/dbias in weight's."""
    cdt = rt.compute_dtype(x.dtype)
    dyr = rt.contiguous(dy if dy.dtype == x.dtype else rt.cast(dy, x.dtype))
    xr = rt.contiguous(x)
    d = x.shape[-1]
    rows = xr.size // d
    w, wt = _ln_weight(weight, x.dtype, cdt)
    mu, rs = (rt.contiguous(rt.up(a).astype(cdt, copy=False)) for a in (mean, rstd))
    dx = rt.empty(x.shape, x.dtype)
    rt.launch_rows(f"layernorm_bwd_dx<{rt.ctype(x.dtype)}, {wt}>", rows, d, raw(dyr), raw(xr), w, mu, rs, raw(dx),
                   scalar(rows, np.int64), scalar(d, np.int32))
    chunks = max(1, min(256, -(-rows // 64)))
    per = -(-rows // chunks) if rows else 1
    # per (row chunk, column) partial sums, then the chunks in order, rounded once to the weight's dtype
    pw, pb = (rt.empty((chunks, d), cdt) if rows else rt.zeros((chunks, d), cdt) for _ in range(2))
    if rows:
        rt.kernel(f"layernorm_bwd_dwdb<{rt.ctype(x.dtype)}>")(
            (-(-d // 128), chunks), (128,),
            (raw(dyr), raw(xr), mu, rs, pw, pb, scalar(rows, np.int64), scalar(d, np.int32),
             scalar(per, np.int64)))
    dweight, dbias = rt.empty((d,), weight.dtype), rt.empty((d,), weight.dtype)
    if d:
        rt.kernel(f"layernorm_bwd_dwdb_sum<{rt.ctype(cdt)}, {rt.ctype(weight.dtype)}>")(
            (-(-d // 128),), (128,), (pw, pb, raw(dweight), raw(dbias), scalar(chunks, np.int32),
                                     scalar(d, np.int32)))
    return dx, dweight, dbias


def _wide(*arrays):
    """Can these contiguous arrays go through the 8-values-a-load kernels? 16-bit, sizes a multiple of 8, and
    16-byte aligned."""
    return all(a.dtype in rt._TWO_BYTE_FLOATS and a.size % 8 == 0 and a.data.ptr % 16 == 0 for a in arrays)


def add(a, b):
    """a + b. fp16/bf16 arrays of one dtype where one is the other's shape or broadcasts over its leading dims
    (a bias) run our kernel; everything else is CuPy's a + b."""
    cp = cupy()
    if not (isinstance(a, cp.ndarray) and isinstance(b, cp.ndarray) and a.dtype == b.dtype
            and a.dtype in rt._TWO_BYTE_FLOATS):
        return a + b
    if b.size > a.size:
        a, b = b, a   # the same sum: IEEE addition commutes
    if b.ndim > a.ndim or a.shape[a.ndim - b.ndim:] != b.shape or (b.size == 0 and a.size):
        return a + b
    ac, bc = rt.contiguous(a), rt.contiguous(b)
    y = rt.empty(a.shape, a.dtype)
    t = rt.ctype(a.dtype)
    if _wide(ac, bc):
        rt.launch_elementwise(f"add8<{t}>", ac.size // 8, raw(ac), raw(bc), raw(y), scalar(ac.size // 8, np.int64),
                              scalar(bc.size // 8, np.int64))
    else:
        rt.launch_elementwise(f"add_k<{t}>", ac.size, raw(ac), raw(bc), raw(y), scalar(ac.size, np.int64),
                              scalar(bc.size, np.int64))
    return y


def gelu(x):
    xr = rt.contiguous(x)
    y = rt.empty(x.shape, x.dtype)
    if _wide(xr):
        rt.launch_elementwise(f"gelu_fwd8<{rt.ctype(x.dtype)}>", xr.size // 8, raw(xr), raw(y),
                              scalar(xr.size // 8, np.int64))
    else:
        rt.launch_elementwise(f"gelu_fwd<{rt.ctype(x.dtype)}>", xr.size, raw(xr), raw(y), scalar(xr.size, np.int64))
    return y


def gelu_backward(dy, x):
    xr = rt.contiguous(x if x.dtype == dy.dtype else rt.cast(x, dy.dtype))
    dyr = rt.contiguous(dy)
    dx = rt.empty(dy.shape, dy.dtype)
    if _wide(dyr, xr):
        rt.launch_elementwise(f"gelu_bwd8<{rt.ctype(dy.dtype)}>", dyr.size // 8, raw(dyr), raw(xr), raw(dx),
                              scalar(dyr.size // 8, np.int64))
    else:
        rt.launch_elementwise(f"gelu_bwd<{rt.ctype(dy.dtype)}>", dyr.size, raw(dyr), raw(xr), raw(dx),
                              scalar(dyr.size, np.int64))
    return dx


# ------------------------------------------------------------------------------------------- embedding
def embedding(weight, ids):
    """Row lookup (V, D)[ids] -> ids.shape + (D,) (an exact gather; negative ids wrap as in numpy)."""
    cp = cupy()
    return cp.take(raw(weight), cp.asarray(ids), axis=0).view(weight.dtype)


def embedding_backward(dout, ids, num_embeddings):
    """Scatter-add of dout rows into (num_embeddings, D), deterministic: rows are sorted by (id, position)
    and each id's run is summed in position order by one thread per column. Returns dout's dtype."""
    cp = cupy()
    d = dout.shape[-1]
    cdt = rt.compute_dtype(dout.dtype)
    flat = cp.asarray(ids).reshape(-1).astype(cp.int64)
    n = flat.size
    dw = cp.zeros((num_embeddings, d), cdt)
    if n and d:
        flat = cp.where(flat < 0, flat + num_embeddings, flat)
        order = cp.argsort(flat * n + cp.arange(n, dtype=cp.int64))  # unique keys: a fixed order
        sorted_ids = flat[order]
        rows = rt.contiguous(dout).reshape(n, d)
        rt.kernel(f"embedding_bwd<{rt.ctype(dout.dtype)}>")(
            (n, -(-d // 128)), (128,),
            (raw(rows), order, sorted_ids, scalar(n, np.int64), scalar(d, np.int32), dw))
    return rt.cast(dw, dout.dtype) if dw.dtype != dout.dtype else dw


# --------------------------------------------------------------------------------------- cross-entropy
def cross_entropy(logits, targets, ignore_index=-100):
    """Mean NLL over rows whose target != ignore_index -> (loss 0-d, lse (N,)), both in the compute dtype.
    All rows ignored: loss 0. A valid target outside [0, C) makes the loss NaN (checked on the device)."""
    cp = cupy()
    cdt = rt.compute_dtype(logits.dtype)
    z = rt.contiguous(logits)
    n, c = z.shape
    t = rt.contiguous(cp.asarray(targets).astype(cp.int64, copy=False))
    lse, nll = rt.empty((n,), cdt), rt.empty((n,), cdt)
    rt.launch_rows(f"xent_fwd<{rt.ctype(z.dtype)}>", n, c, raw(z), t, lse, nll, scalar(n, np.int64),
                   scalar(c, np.int32), scalar(ignore_index, np.int64))
    count = cp.maximum((t != ignore_index).sum(), 1).astype(cdt)
    loss = (nll.sum() / count).astype(cdt)
    return loss, lse


def cross_entropy_backward(dloss, logits, targets, lse, ignore_index=-100):
    """(softmax(logits) - onehot(target)) * dloss / count on valid rows; logits' dtype."""
    cp = cupy()
    cdt = rt.compute_dtype(logits.dtype)
    z = rt.contiguous(logits)
    n, c = z.shape
    t = rt.contiguous(cp.asarray(targets).astype(cp.int64, copy=False))
    # dloss / count in float64 (as float(dloss) / count in the reference), rounded once to the compute dtype
    count = cp.maximum((t != ignore_index).sum(), 1)
    dl = dloss.astype(cp.float64) if isinstance(dloss, cp.ndarray) else cp.asarray(float(dloss), cp.float64)
    coef = (dl / count).astype(cdt).reshape(1)
    l = rt.contiguous(rt.up(lse).astype(cdt, copy=False))
    dz = rt.empty(z.shape, z.dtype)
    rt.launch_rows(f"xent_bwd<{rt.ctype(z.dtype)}>", n, c, raw(z), t, l, coef, raw(dz), scalar(n, np.int64),
                   scalar(c, np.int32), scalar(ignore_index, np.int64))
    return dz
