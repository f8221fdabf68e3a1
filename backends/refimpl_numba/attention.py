"""numba attention: FlashAttention-2 forward and backward, tile products through BLAS, the rest fused in numba.

Mirrors refimpl/kernels/attention.py (`attention`, `attention_tiled` and their backwards): same arguments,
dtypes in and out, masks and errors (the reference's own input checks are reused). One tiled algorithm
serves both forms of the interface: `block_size=k` walks (k, k) tiles with the online softmax (Dao 2023,
arXiv 2307.08691, Algorithms 1 and 2), and the plain form (`block_size=None`) is the same loop with one
tile spanning both sequences, i.e. the materialised (Tq, Tk) score matrix of the reference's plain form.

Why this split: the tile products go to NumPy's batched `@` (BLAS) over all (batch, head) at once, because
numba's hand-written product loops ran at 2-5 GFLOP/s where BLAS per tile reaches 16-29. Everything
elementwise between the products -- scale, causal and padding masks, row max, exp, row sums, the
online-softmax rescaling, dS = P (dP - D_i) -- is one numba pass per tile, parallel over rows (prange),
with a vectorised float32 exp (_vmath.py): the NumPy reference makes five to eight temporaries there.

Conventions are the reference's: key_padding_mask (B, Tk) True = padding; causal lets query i see keys
j <= i + (Tk - Tq); a query row with no visible key gets out = 0, lse = -inf and zero gradients.
"""
import numpy as np
from numba import njit, prange

from refimpl.kernels import attention as ref

from ._vmath import vexp


def _T(a):  # transpose the last two axes: (..., m, n) -> (..., n, m)
    return a.swapaxes(-1, -2)


@njit(inline="always")
def _hidden(mask_b, q, k, causal, offset):
    """True when query q may not see key k (padding, or above the causal diagonal)."""
    return mask_b[k] or (causal and k > q + offset)


# -------------------------------------------------------------------------------------------- forward
@njit(parallel=True, cache=True)
def _online_softmax_tile(S, mask, q0, k0, causal, offset, scale, m, l, alpha):
    """Fold the raw score tile S = Q_i K_j^T (B, H, bq, bk) into the running max m and sum l (B, H, bq) of
    each query row: S becomes P = exp(scale S - m_new) (0 where hidden), alpha the factor that re-bases
    the old sums (0 while m was -inf). Parallel over the B*H*bq rows."""
    B, H, bq, bk = S.shape
    zero = S.dtype.type(0)
    ninf = S.dtype.type(-np.inf)
    for row in prange(B * H * bq):
        b, h, i = row // (H * bq), (row // bq) % H, row % bq
        s = S[b, h, i]
        mx = m[b, h, i]
        for j in range(bk):
            x = ninf if _hidden(mask[b], q0 + i, k0 + j, causal, offset) else scale * s[j]
            s[j] = x
            mx = max(mx, x)
        m_safe = mx if np.isfinite(mx) else zero       # no key seen yet: shift by 0, exp(-inf) = 0
        for j in range(bk):                              # no reduction in this loop: it vectorises
            s[j] = vexp(s[j] - m_safe)
        rowsum = zero
        for j in range(bk):
            rowsum += s[j]
        a = vexp(m[b, h, i] - m_safe)
        alpha[b, h, i] = a
        l[b, h, i] = a * l[b, h, i] + rowsum
        m[b, h, i] = mx


@njit(parallel=True, cache=True)
def _normalise(acc, m, l, out, lse):
    """out = acc / l, lse = m + log(l); rows with no visible key (l == 0): out 0, lse -inf."""
    B, H, bq, Dv = acc.shape
    for row in prange(B * H * bq):
        b, h, i = row // (H * bq), (row // bq) % H, row % bq
        has_keys = l[b, h, i] > 0
        for e in range(Dv):
            out[b, h, i, e] = acc[b, h, i, e] / l[b, h, i] if has_keys else 0
        mi = m[b, h, i] if np.isfinite(m[b, h, i]) else 0
        lse[b, h, i] = mi + np.log(l[b, h, i]) if has_keys else -np.inf


def _flash_forward(Q, K, V, mask, causal, scale, bq, bk):
    """FlashAttention-2 Algorithm 1 over (bq, bk) tiles of all (batch, head) at once."""
    B, H, Tq, _ = Q.shape
    Tk, Dv = K.shape[2], V.shape[3]
    out = np.empty((B, H, Tq, Dv), Q.dtype)
    lse = np.empty((B, H, Tq), Q.dtype)
    for q0 in range(0, Tq, bq):
        q1 = min(q0 + bq, Tq)
        m = np.full((B, H, q1 - q0), -np.inf, Q.dtype)
        l = np.zeros((B, H, q1 - q0), Q.dtype)
        alpha = np.empty_like(l)
        acc = None
        for k0 in range(0, Tk, bk):
            if ref._above_diagonal(q1, k0, Tq, Tk, causal):
                break                                    # and so is every later key block
            k1 = min(k0 + bk, Tk)
            S = Q[:, :, q0:q1] @ _T(K[:, :, k0:k1])      # (B, H, bq, bk), BLAS
            _online_softmax_tile(S, mask, q0, k0, causal, Tk - Tq, scale, m, l, alpha)
            PV = S @ V[:, :, k0:k1]                      # (B, H, bq, Dv)
            acc = PV if acc is None else alpha[..., None] * acc + PV
        if acc is None:                                  # every key block skipped: nothing visible
            acc = np.zeros((B, H, q1 - q0, Dv), Q.dtype)
        _normalise(acc, m, l, out[:, :, q0:q1], lse[:, :, q0:q1])
    return out, lse


# ------------------------------------------------------------------------------------------- backward
@njit(parallel=True, cache=True)
def _ds_tile(S, dP, mask, q0, k0, causal, offset, scale, L, Di):
    """Given the raw score tile S = Q_i K_j^T and dP = dO_i V_j^T (B, H, bq, bk): S becomes
    P = exp(scale S - L) (0 where hidden), dP becomes dS = P (dP - D_i). L: lse with -inf as 0."""
    B, H, bq, bk = S.shape
    ninf = S.dtype.type(-np.inf)
    for row in prange(B * H * bq):
        b, h, i = row // (H * bq), (row // bq) % H, row % bq
        s, dp = S[b, h, i], dP[b, h, i]
        Li, Dii = L[b, h, q0 + i], Di[b, h, q0 + i]
        for j in range(bk):
            s[j] = ninf if _hidden(mask[b], q0 + i, k0 + j, causal, offset) else scale * s[j]
        for j in range(bk):                              # vectorises
            p = vexp(s[j] - Li)
            s[j] = p
            dp[j] = p * (dp[j] - Dii)


def _flash_backward(dO, Q, K, V, O, L, mask, causal, scale, bq, bk):
    """FlashAttention-2 Algorithm 2 over (bq, bk) tiles of all (batch, head) at once."""
    Tq, Tk = Q.shape[2], K.shape[2]
    Di = (dO * O).sum(axis=-1)                           # (B, H, Tq) = rowsum(P * dP)
    L = np.where(np.isfinite(L), L, 0).astype(Q.dtype, copy=False)  # -inf (no key): P = exp(-inf) = 0
    dQ = np.zeros_like(Q)
    dK, dV = np.empty_like(K), np.empty_like(V)
    for k0 in range(0, Tk, bk):
        k1 = min(k0 + bk, Tk)
        Kj, Vj = K[:, :, k0:k1], V[:, :, k0:k1]
        dKj, dVj = np.zeros(Kj.shape, Q.dtype), np.zeros(Vj.shape, Q.dtype)
        for q0 in range(0, Tq, bq):
            q1 = min(q0 + bq, Tq)
            if ref._above_diagonal(q1, k0, Tq, Tk, causal):
                continue                                 # these queries see none of this key block
            Qi, dOi = Q[:, :, q0:q1], dO[:, :, q0:q1]
            S = Qi @ _T(Kj)                              # (B, H, bq, bk), BLAS
            dP = dOi @ _T(Vj)                            # (B, H, bq, bk)
            _ds_tile(S, dP, mask, q0, k0, causal, Tk - Tq, scale, L, Di)
            dVj += _T(S) @ dOi                           # dV += P^T dO
            dQ[:, :, q0:q1] += scale * (dP @ Kj)         # dQ += scale dS K
            dKj += scale * (_T(dP) @ Qi)                 # dK += scale dS^T Q
        dK[:, :, k0:k1], dV[:, :, k0:k1] = dKj, dVj
    return dQ, dK, dV


# ------------------------------------------------------------------------------------------- wrappers
def _prepare(q, k, v, key_padding_mask, block_size):
    """Checks as the reference; returns (compute dtype, D, mask (B, Tk) bool, tile (bq, bk))."""
    bs = 1 if block_size is None else block_size
    B, H, Tq, Tk, D = ref._check_inputs(q, k, v, key_padding_mask, bs, bs)
    dt = ref._compute_dtype(q, k, v)
    mask = np.zeros((B, Tk), np.bool_) if key_padding_mask is None else np.ascontiguousarray(key_padding_mask)
    tile = (Tq, Tk) if block_size is None else (min(block_size, Tq), min(block_size, Tk))
    return dt, D, mask, tile


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, block_size=None):
    """Mirrors the reference `attention` (block_size=None) and `attention_tiled` (square blocks):
    returns (out (B, H, Tq, Dv) in q.dtype, lse (B, H, Tq) in the compute dtype)."""
    dt, D, mask, (bq, bk) = _prepare(q, k, v, key_padding_mask, block_size)
    Q, K, V = (np.ascontiguousarray(a, dtype=dt) for a in (q, k, v))
    out, lse = _flash_forward(Q, K, V, mask, bool(causal), ref._scale(scale, D, dt), bq, bk)
    return out.astype(q.dtype, copy=False), lse


def attention_backward(dout, q, k, v, out, lse, *, causal=False, key_padding_mask=None, scale=None,
                       block_size=None):
    """Mirrors the reference `attention_backward` / `attention_tiled_backward`: returns (dq, dk, dv) in
    q's, k's and v's dtypes."""
    dt, D, mask, (bq, bk) = _prepare(q, k, v, key_padding_mask, block_size)
    ref._check_backward_inputs(dout, out, lse, q, v)
    dO, Q, K, V, O, L = (np.ascontiguousarray(a, dtype=dt) for a in (dout, q, k, v, out, lse))
    dq, dk, dv = _flash_backward(dO, Q, K, V, O, L, mask, bool(causal), ref._scale(scale, D, dt), bq, bk)
    return dq.astype(q.dtype, copy=False), dk.astype(k.dtype, copy=False), dv.astype(v.dtype, copy=False)
