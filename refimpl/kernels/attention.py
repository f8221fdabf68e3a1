"""Reference attention kernels: plain and FlashAttention-tiled, forward and backward.

This is the NumPy specification of the backend interface's ``attention`` / ``attention_backward`` kernels
(docs/architecture.md, "The backend interface"), given in two numerically equivalent forms:

- ``attention`` / ``attention_backward`` -- the obviously-correct form: materialise the (Tq, Tk) scores
  S = scale * Q K^T, mask them with -inf, take a max-shifted softmax.
- ``attention_tiled`` / ``attention_tiled_backward`` -- FlashAttention's algorithm (Dao et al. 2022,
  arXiv 2205.14135, Algorithm 1; FlashAttention-2, Dao 2023, arXiv 2307.08691, Algorithms 1 and 2): walk
  over (block_q, block_k) tiles with the online softmax and never hold the whole score matrix, so working
  memory is bounded by the tile, not the sequence (the same idea as ZeRO-Infinity's memory-centric tiling).

Both forward forms return the log-sum-exp ``lse`` of each query row's scaled, masked scores; backward
recomputes P = exp(S - lse) from it instead of saving P, as FlashAttention does.

Conventions (PyTorch's): ``key_padding_mask`` is (B, Tk) bool with True = padding (the key is ignored);
``causal`` lets query i see keys j <= i + (Tk - Tq), i.e. the diagonal is aligned at the end, which is
``is_causal`` for Tq == Tk. A query row with no visible key gets out = 0, lse = -inf and zero gradients.

The code takes its array namespace ``xp`` from the inputs, so the same functions run on CuPy arrays.
"""
import math

import numpy as np

from . import array_module

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


_xp = array_module  # Chainer's get_array_module pattern (refimpl/kernels/__init__.py)


# ----------------------------------------------------------------------------------------------- helpers
def _check_inputs(q, k, v, key_padding_mask, block_q=1, block_k=1):
    """Validate shapes, dtypes and block sizes; return (B, H, Tq, Tk, D)."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, D), got shape {a.shape}")
        if a.dtype.name not in _FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {a.dtype}; allowed: {', '.join(_FLOAT_DTYPES)}")
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if k.shape != (B, H, Tk, D):
        raise ValueError(f"k has shape {k.shape}; expected (B, H, Tk, D) = ({B}, {H}, Tk, {D}) to match "
                         f"q {q.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v has shape {v.shape}; expected (B, H, Tk, Dv) with (B, H, Tk) = {k.shape[:3]}")
    if min(Tq, Tk, D) < 1:
        raise ValueError(f"sequence lengths and head dim must be >= 1, got Tq={Tq}, Tk={Tk}, D={D}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Tk) or key_padding_mask.dtype != np.bool_:
            raise ValueError(f"key_padding_mask must be bool of shape (B, Tk) = ({B}, {Tk}), got "
                             f"{key_padding_mask.dtype} {key_padding_mask.shape}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 1:
            raise ValueError(f"{name} must be a positive int, got {b!r}")
    return B, H, Tq, Tk, D


def _check_backward_inputs(dout, out, lse, q, v):
    B, H, Tq, _ = q.shape
    out_shape = (B, H, Tq, v.shape[3])
    if dout.shape != out_shape or out.shape != out_shape:
        raise ValueError(f"dout and out must have shape {out_shape}, got {dout.shape} and {out.shape}")
    if lse.shape != (B, H, Tq):
        raise ValueError(f"lse must have shape {(B, H, Tq)}, got {lse.shape}")


def _compute_dtype(*arrays):
    # float64 stays float64; float16 / bfloat16 / float32 are all accumulated in float32.
    return np.float64 if any(a.dtype == np.float64 for a in arrays) else np.float32


def _scale(scale, D, dt):
    # A NumPy scalar of the compute dtype, so a float64 `scale` cannot silently upcast float32 work.
    return dt(1.0 / math.sqrt(D) if scale is None else scale)


def _mask_scores(S, q0, k0, Tq, Tk, causal, key_padding_mask):
    """Return the score tile S (B, H, bq, bk), whose top-left entry is (query q0, key k0), with the
    entries a query may not see set to -inf (so they get exactly zero probability)."""
    xp = _xp(S)
    bq, bk = S.shape[-2:]
    allowed = None
    if causal:
        i = xp.arange(q0, q0 + bq)[:, None]                 # (bq, 1)  query positions
        j = xp.arange(k0, k0 + bk)[None, :]                 # (1, bk)  key positions
        allowed = j <= i + (Tk - Tq)                        # (bq, bk) diagonal aligned at the end
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, k0:k0 + bk]  # (B, 1, 1, bk)  True = real key
        allowed = keep if allowed is None else allowed & keep
    return S if allowed is None else xp.where(allowed, S, -np.inf)


def _above_diagonal(q1, k0, Tq, Tk, causal):
    """True when key block starting at k0 is invisible to every query < q1 (skip it entirely)."""
    return causal and k0 > (q1 - 1) + (Tk - Tq)


def _finite_or_zero(m):
    # A row with no visible key has max (or lse) -inf. Shifting it by 0 instead keeps exp(-inf - 0) = 0;
    # shifting by -inf would give exp(-inf - -inf) = exp(nan).
    xp = _xp(m)
    return xp.where(xp.isfinite(m), m, 0)


def _normalise(acc, m, l):
    """out = acc / l and lse = m + log(l), row by row; rows with l == 0 (no visible key) get out = 0 and
    lse = -inf. acc: (B, H, bq, Dv), m and l: (B, H, bq) with m finite."""
    xp = _xp(acc)
    has_keys = l > 0                                        # (B, H, bq)  l >= 1 whenever a key is visible
    l_safe = xp.where(has_keys, l, 1)
    out = acc / l_safe[..., None]                           # acc is 0 on empty rows, so out is 0 there
    lse = xp.where(has_keys, m + xp.log(l_safe), -np.inf)
    return out, lse


def _T(a):  # transpose the last two axes: (..., m, n) -> (..., n, m)
    return a.swapaxes(-1, -2)


# ------------------------------------------------------------------------------------------- plain form
def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    """Plain (materialised-scores) scaled dot-product attention.

    q: (B, H, Tq, D), k: (B, H, Tk, D), v: (B, H, Tk, Dv) (normally Dv == D); float16/bfloat16 are computed
    in float32 and the output is cast back to q.dtype, float64 stays float64. key_padding_mask: (B, Tk) bool,
    True = padding. causal: query i sees keys j <= i + (Tk - Tq). scale: default 1/sqrt(D).
    Returns (out (B, H, Tq, Dv) in q.dtype, lse (B, H, Tq) in the compute dtype). A row whose keys are all
    masked has out = 0 and lse = -inf.
    """
    B, H, Tq, Tk, D = _check_inputs(q, k, v, key_padding_mask)
    xp, dt = _xp(q), _compute_dtype(q, k, v)
    scale = _scale(scale, D, dt)
    Q, K, V = (a.astype(dt, copy=False) for a in (q, k, v))
    S = scale * (Q @ _T(K))                                 # (B, H, Tq, Tk)
    S = _mask_scores(S, 0, 0, Tq, Tk, causal, key_padding_mask)
    m = _finite_or_zero(S.max(axis=-1))                     # (B, H, Tq)  row max: the softmax shift
    P = xp.exp(S - m[..., None])                            # (B, H, Tq, Tk)  unnormalised; 0 where masked
    l = P.sum(axis=-1)                                      # (B, H, Tq)
    out, lse = _normalise(P @ V, m, l)                      # (B, H, Tq, Dv), (B, H, Tq)
    return out.astype(q.dtype), lse


def attention_backward(dout, q, k, v, out, lse, *, causal=False, key_padding_mask=None, scale=None):
    """Gradients of attention(): returns (dq, dk, dv) in q's, k's and v's dtypes.

    Recomputes P = exp(S - lse) (no saved P) and uses D_i = rowsum(dout * out), which equals
    rowsum(P * dP) (FlashAttention-2, Algorithm 2), so that dS = P * (dP - D_i) is the softmax backward.
    Fully masked rows have P = 0 and so contribute zero gradient.
    """
    B, H, Tq, Tk, D = _check_inputs(q, k, v, key_padding_mask)
    _check_backward_inputs(dout, out, lse, q, v)
    xp, dt = _xp(q), _compute_dtype(q, k, v)
    scale = _scale(scale, D, dt)
    Q, K, V, dO, O, L = (a.astype(dt, copy=False) for a in (q, k, v, dout, out, lse))
    S = scale * (Q @ _T(K))                                 # (B, H, Tq, Tk)
    S = _mask_scores(S, 0, 0, Tq, Tk, causal, key_padding_mask)
    P = xp.exp(S - _finite_or_zero(L)[..., None])           # (B, H, Tq, Tk)  the softmax, recomputed
    Di = (dO * O).sum(axis=-1)                              # (B, H, Tq)
    dV = _T(P) @ dO                                         # (B, H, Tk, Dv)
    dP = dO @ _T(V)                                         # (B, H, Tq, Tk)
    dS = P * (dP - Di[..., None])                           # (B, H, Tq, Tk)  gradient w.r.t. the scores
    dQ = scale * (dS @ K)                                   # (B, H, Tq, D)
    dK = scale * (_T(dS) @ Q)                               # (B, H, Tk, D)
    return dQ.astype(q.dtype), dK.astype(k.dtype), dV.astype(v.dtype)


# ------------------------------------------------------------------------------------------- tiled form
def attention_tiled(q, k, v, *, causal=False, key_padding_mask=None, scale=None, block_q=64, block_k=64):
    """FlashAttention forward (FlashAttention-2, Algorithm 1): outer loop over query blocks, inner loop over
    key blocks with the online softmax (running max m, running sum l, rescaled accumulator), never
    materialising the (Tq, Tk) matrix. Key blocks entirely above the causal diagonal are skipped.
    Same arguments and returns as attention(); block sizes need not divide Tq, Tk.
    """
    B, H, Tq, Tk, D = _check_inputs(q, k, v, key_padding_mask, block_q, block_k)
    xp, dt = _xp(q), _compute_dtype(q, k, v)
    scale = _scale(scale, D, dt)
    Q, K, V = (a.astype(dt, copy=False) for a in (q, k, v))
    Dv = V.shape[-1]
    out = xp.empty((B, H, Tq, Dv), dtype=dt)
    lse = xp.empty((B, H, Tq), dtype=dt)
    for q0 in range(0, Tq, block_q):
        q1 = min(q0 + block_q, Tq)
        Qi = Q[:, :, q0:q1]                                 # (B, H, bq, D)
        m = xp.full((B, H, q1 - q0), -np.inf, dtype=dt)     # running row max of the scores seen so far
        l = xp.zeros((B, H, q1 - q0), dtype=dt)             # running sum of exp(S - m)
        acc = xp.zeros((B, H, q1 - q0, Dv), dtype=dt)       # running sum of exp(S - m) @ V
        for k0 in range(0, Tk, block_k):
            if _above_diagonal(q1, k0, Tq, Tk, causal):
                break                                       # and so is every later key block
            k1 = min(k0 + block_k, Tk)
            S = scale * (Qi @ _T(K[:, :, k0:k1]))           # (B, H, bq, bk)
            S = _mask_scores(S, q0, k0, Tq, Tk, causal, key_padding_mask)
            m_new = xp.maximum(m, S.max(axis=-1))           # (B, H, bq)
            m_safe = _finite_or_zero(m_new)
            P = xp.exp(S - m_safe[..., None])               # (B, H, bq, bk)
            alpha = xp.exp(m - m_safe)                      # (B, H, bq) re-bases the old sums; 0 if m was -inf
            l = alpha * l + P.sum(axis=-1)
            acc = alpha[..., None] * acc + P @ V[:, :, k0:k1]
            m = m_new
        out[:, :, q0:q1], lse[:, :, q0:q1] = _normalise(acc, _finite_or_zero(m), l)
    return out.astype(q.dtype), lse


def attention_tiled_backward(dout, q, k, v, out, lse, *, causal=False, key_padding_mask=None, scale=None,
                             block_q=64, block_k=64):
    """FlashAttention-2 backward (Algorithm 2): outer loop over key blocks, inner loop over query blocks,
    recomputing P from lse block by block; dK, dV accumulate per key block, dQ across key blocks.
    Same arguments and returns as attention_backward().
    """
    B, H, Tq, Tk, D = _check_inputs(q, k, v, key_padding_mask, block_q, block_k)
    _check_backward_inputs(dout, out, lse, q, v)
    xp, dt = _xp(q), _compute_dtype(q, k, v)
    scale = _scale(scale, D, dt)
    Q, K, V, dO, O, L = (a.astype(dt, copy=False) for a in (q, k, v, dout, out, lse))
    Di = (dO * O).sum(axis=-1)                              # (B, H, Tq)  = rowsum(P * dP)
    L = _finite_or_zero(L)                                  # (B, H, Tq)  as in the plain form
    dQ = xp.zeros(Q.shape, dtype=dt)                        # (B, H, Tq, D)
    dK = xp.empty(K.shape, dtype=dt)                        # (B, H, Tk, D)
    dV = xp.empty(V.shape, dtype=dt)                        # (B, H, Tk, Dv)
    for k0 in range(0, Tk, block_k):
        k1 = min(k0 + block_k, Tk)
        Kj, Vj = K[:, :, k0:k1], V[:, :, k0:k1]             # (B, H, bk, D), (B, H, bk, Dv)
        dKj = xp.zeros(Kj.shape, dtype=dt)
        dVj = xp.zeros(Vj.shape, dtype=dt)
        for q0 in range(0, Tq, block_q):
            q1 = min(q0 + block_q, Tq)
            if _above_diagonal(q1, k0, Tq, Tk, causal):
                continue                                    # these queries see none of this key block
            Qi, dOi = Q[:, :, q0:q1], dO[:, :, q0:q1]       # (B, H, bq, D), (B, H, bq, Dv)
            S = scale * (Qi @ _T(Kj))                       # (B, H, bq, bk)
            S = _mask_scores(S, q0, k0, Tq, Tk, causal, key_padding_mask)
            P = xp.exp(S - L[:, :, q0:q1, None])            # (B, H, bq, bk)
            dVj += _T(P) @ dOi                              # (B, H, bk, Dv)
            dP = dOi @ _T(Vj)                               # (B, H, bq, bk)
            dS = P * (dP - Di[:, :, q0:q1, None])           # (B, H, bq, bk)
            dQ[:, :, q0:q1] += scale * (dS @ Kj)            # (B, H, bq, D)
            dKj += scale * (_T(dS) @ Qi)                    # (B, H, bk, D)
        dK[:, :, k0:k1], dV[:, :, k0:k1] = dKj, dVj
    return dQ.astype(q.dtype), dK.astype(k.dtype), dV.astype(v.dtype)
