"""Reference kernels for the dense layers of a transformer, forward and backward side by side.

These are the specification of the backend interface (refimpl/backend.py): readable, exact, float64
capable. Low-precision inputs (float16, ml_dtypes.bfloat16) are computed in float32 and the result is
cast back to the input dtype: "CPU backends may compute in fp32 on upcast operands; the bytes stored and
moved are the low-precision ones" (docs/architecture.md, "Numerics"). float64 stays float64 (for gradient checks).
"""
import math

import numpy as np

from . import array_module


_xp = array_module  # Chainer's get_array_module pattern (refimpl/kernels/__init__.py)


def compute_dtype(dtype):
    """The dtype arithmetic runs in: float64 stays float64, everything else computes in float32."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _up(x):
    """Upcast to the compute dtype (no copy when already there)."""
    return x.astype(compute_dtype(x.dtype), copy=False)


# ----------------------------------------------------------------------------------------------- matmul
def matmul(a, b, transpose_a=False, transpose_b=False):
    """Batched a @ b over the last two dims (numpy broadcasting over leading dims), fp32 accumulation.

    transpose_a / transpose_b use the transposed last two dims, as cuBLAS's op(A), op(B)."""
    if transpose_a:
        a = a.swapaxes(-1, -2)
    if transpose_b:
        b = b.swapaxes(-1, -2)
    out_dtype = np.result_type(a.dtype, b.dtype)
    if b.ndim == 2 and a.ndim > 2:
        # (..., M, K) @ (K, N) is one (prod(...)*M, K) @ (K, N) GEMM, not a loop of small ones
        y = _up(a).reshape(-1, a.shape[-1]) @ _up(b)
        return y.reshape(*a.shape[:-1], b.shape[-1]).astype(out_dtype, copy=False)
    return (_up(a) @ _up(b)).astype(out_dtype, copy=False)


# ---------------------------------------------------------------------------------------------- softmax
def softmax(x, axis=-1):
    xp = _xp(x)
    xc = _up(x)
    e = xp.exp(xc - xc.max(axis=axis, keepdims=True))  # subtract the max: exp never overflows
    return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype, copy=False)


def softmax_backward(dy, y, axis=-1):
    """dx = y * (dy - sum(dy * y)): the Jacobian of softmax applied to dy without forming it."""
    dyc, yc = _up(dy), _up(y)
    return (yc * (dyc - (dyc * yc).sum(axis=axis, keepdims=True))).astype(dy.dtype, copy=False)


# -------------------------------------------------------------------------------------------- layernorm
def layernorm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dim (Ba et al. 2016). Returns (y, mean, rstd); mean/rstd (..., 1) in the
    compute dtype are what backward needs, as in apex/PyTorch's fused kernels."""
    xp = _xp(x)
    xc = _up(x)
    mean = xc.mean(axis=-1, keepdims=True)
    var = ((xc - mean) ** 2).mean(axis=-1, keepdims=True)  # biased variance, as torch
    rstd = 1.0 / xp.sqrt(var + eps)
    y = (xc - mean) * rstd * _up(weight) + _up(bias)
    return y.astype(x.dtype, copy=False), mean, rstd


def layernorm_backward(dy, x, weight, mean, rstd):
    """Returns (dx, dweight, dbias). With xhat = (x - mean) * rstd and g = dy * weight:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))."""
    dyc, xc = _up(dy), _up(x)
    xhat = (xc - mean) * rstd
    lead = tuple(range(dy.ndim - 1))  # reduce over every dim but the normalised one
    dweight = (dyc * xhat).sum(axis=lead)
    dbias = dyc.sum(axis=lead)
    g = dyc * _up(weight)
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return (dx.astype(x.dtype, copy=False), dweight.astype(weight.dtype, copy=False),
            dbias.astype(weight.dtype, copy=False))


# -------------------------------------------------------------------------------------------------- add
def add(a, b):
    """a + b with NumPy broadcasting, in the result dtype, rounded once: the residual stream, bias adds and
    gradient accumulation. A kernel so GPU backends can run the 16-bit adds with wide memory accesses."""
    return a + b


# ------------------------------------------------------------------------------------------------- gelu
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016; GPT-2; torch's approximate="tanh")."""
    xp = _xp(x)
    xc = _up(x)
    inner = _SQRT_2_OVER_PI * (xc + 0.044715 * (xc * xc * xc))  # x*x*x: pow is slow
    return (0.5 * xc * (1.0 + xp.tanh(inner))).astype(x.dtype, copy=False)


def gelu_backward(dy, x):
    xp = _xp(x)
    xc = _up(x)
    t = xp.tanh(_SQRT_2_OVER_PI * (xc + 0.044715 * (xc * xc * xc)))
    dinner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * (xc * xc))
    dgelu = 0.5 * (1.0 + t) + 0.5 * xc * (1.0 - t * t) * dinner
    return (_up(dy) * dgelu).astype(dy.dtype, copy=False)


# -------------------------------------------------------------------------------------------- embedding
def embedding(weight, ids):
    """Row lookup: (V, D)[ids] -> ids.shape + (D,)."""
    return weight[ids]


def embedding_backward(dout, ids, num_embeddings):
    """Scatter-add of output gradients into the rows that were read (a row read twice gets both).

    Returns dweight (num_embeddings, D) in dout's dtype; accumulation in the compute dtype."""
    xp = _xp(dout)
    d = dout.shape[-1]
    dweight = xp.zeros((num_embeddings, d), dtype=compute_dtype(dout.dtype))
    # np.add.at is unbuffered: repeated indices accumulate instead of overwriting.
    xp.add.at(dweight, ids.reshape(-1), _up(dout).reshape(-1, d))
    return dweight.astype(dout.dtype, copy=False)


# ---------------------------------------------------------------------------------------- cross-entropy
def cross_entropy(logits, targets, ignore_index=-100):
    """Mean negative log-likelihood over rows whose target != ignore_index (torch's reduction="mean").

    logits (N, C), targets (N,) int. Returns (loss as a 0-d compute-dtype array, lse (N,)): the per-row
    log-sum-exp is what backward needs. All rows ignored -> loss 0 (torch gives NaN; 0 keeps sums finite)."""
    xp = _xp(logits)
    z = _up(logits)
    zmax = z.max(axis=-1, keepdims=True)
    lse = (zmax + xp.log(xp.exp(z - zmax).sum(axis=-1, keepdims=True)))[:, 0]  # (N,)
    valid = targets != ignore_index
    safe_t = xp.where(valid, targets, 0)
    nll = lse - xp.take_along_axis(z, safe_t[:, None], axis=-1)[:, 0]  # (N,)
    count = max(int(valid.sum()), 1)
    loss = xp.asarray(xp.where(valid, nll, 0.0).sum() / count, dtype=z.dtype)  # 0-d array, not a scalar
    return loss, lse


def cross_entropy_backward(dloss, logits, targets, lse, ignore_index=-100):
    """d/dlogits of the mean NLL: (softmax(logits) - onehot(target)) * dloss / count on valid rows."""
    xp = _xp(logits)
    valid = targets != ignore_index
    count = max(int(valid.sum()), 1)
    p = xp.exp(_up(logits) - lse[:, None])  # softmax from the saved lse
    p[xp.arange(len(targets)), xp.where(valid, targets, 0)] -= 1.0
    p *= (valid[:, None] * (float(dloss) / count))
    return p.astype(logits.dtype, copy=False)
