"""numba attention: FlashAttention-2 forward and backward, parallel over (batch, head) with prange.

Mirrors refimpl/kernels/attention.py (`attention`, `attention_tiled` and their backwards): same arguments,
dtypes in and out, masks and errors (the reference's own input checks are reused). One tiled kernel serves
both forms of the interface: `block_size=k` walks (k, k) tiles with the online softmax (Dao 2023, arXiv
2307.08691, Algorithms 1 and 2), and the plain form (`block_size=None`) is the same kernel with one tile
spanning both sequences, i.e. the materialised (Tq, Tk) score matrix of the reference's plain form.

Conventions are the reference's: key_padding_mask (B, Tk) True = padding; causal lets query i see keys
j <= i + (Tk - Tq); a query row with no visible key gets out = 0, lse = -inf and zero gradients.
Inner loops run over a contiguous axis (K and V are transposed per head) so they are axpy's, which
vectorise without reassociating sums.
"""
import numpy as np
from numba import njit, prange

from refimpl.kernels import attention as ref


# ---------------------------------------------------------------------------------------- tile helpers
@njit(cache=True)
def _scores(Q, Kt, mask, q0, q1, k0, k1, causal, offset, scale, S):
    """S[:q1-q0, :k1-k0] = scale * Q[q0:q1] @ Kt[:, k0:k1], entries a query may not see set to -inf."""
    ninf = S.dtype.type(-np.inf)
    for i in range(q1 - q0):
        for j in range(k1 - k0):
            S[i, j] = 0
        for d in range(Q.shape[1]):
            qd = Q[q0 + i, d]
            for j in range(k1 - k0):
                S[i, j] += qd * Kt[d, k0 + j]
        for j in range(k1 - k0):
            hidden = mask[k0 + j] or (causal and k0 + j > q0 + i + offset)
            S[i, j] = ninf if hidden else scale * S[i, j]


@njit(cache=True)
def _above_diagonal(q1, k0, Tq, Tk, causal):
    """True when the key block starting at k0 is invisible to every query < q1 (skip it)."""
    return causal and k0 > (q1 - 1) + (Tk - Tq)


# -------------------------------------------------------------------------------------------- forward
@njit(cache=True)
def _online_softmax_update(S, V, k0, nq, nk, m, l, acc, pv):
    """Fold score tile S (nq, nk) into the running max m, sum l and accumulator acc of each query row."""
    zero = S.dtype.type(0)
    for i in range(nq):
        mx = m[i]
        for j in range(nk):
            mx = max(mx, S[i, j])
        m_safe = mx if np.isfinite(mx) else zero       # no key seen yet: shift by 0, exp(-inf) = 0
        alpha = np.exp(m[i] - m_safe)                    # re-bases the old sums; 0 while m was -inf
        rowsum = zero
        pv[:] = zero
        for j in range(nk):
            p = np.exp(S[i, j] - m_safe)                 # 0 where masked
            rowsum += p
            for e in range(V.shape[1]):
                pv[e] += p * V[k0 + j, e]
        l[i] = alpha * l[i] + rowsum
        for e in range(V.shape[1]):
            acc[i, e] = alpha * acc[i, e] + pv[e]
        m[i] = mx


@njit(cache=True)
def _head_forward(Q, K, V, mask, causal, scale, bq, bk, out, lse):
    """One (batch, head): FlashAttention-2 Algorithm 1 over (bq, bk) tiles; writes out (Tq, Dv), lse (Tq,)."""
    Tq, Tk, Dv = Q.shape[0], K.shape[0], V.shape[1]
    Kt = np.ascontiguousarray(K.T)                       # (D, Tk)
    S = np.empty((bq, bk), Q.dtype)                      # one score tile: the working memory
    m, l = np.empty(bq, Q.dtype), np.empty(bq, Q.dtype)
    acc, pv = np.empty((bq, Dv), Q.dtype), np.empty(Dv, Q.dtype)
    for q0 in range(0, Tq, bq):
        q1 = min(q0 + bq, Tq)
        m[:] = -np.inf
        l[:] = 0
        acc[:] = 0
        for k0 in range(0, Tk, bk):
            if _above_diagonal(q1, k0, Tq, Tk, causal):
                break                                    # and so is every later key block
            k1 = min(k0 + bk, Tk)
            _scores(Q, Kt, mask, q0, q1, k0, k1, causal, Tk - Tq, scale, S)
            _online_softmax_update(S, V, k0, q1 - q0, k1 - k0, m, l, acc, pv)
        for i in range(q1 - q0):                         # normalise; rows with no key: out 0, lse -inf
            has_keys = l[i] > 0
            for e in range(Dv):
                out[q0 + i, e] = acc[i, e] / l[i] if has_keys else 0
            lse[q0 + i] = m[i] + np.log(l[i]) if has_keys else -np.inf


@njit(parallel=True, cache=True)
def _flash_forward(Q, K, V, mask, causal, scale, bq, bk):
    """Parallel over (batch, head); the work is _head_forward (kept out of the parfor: faster compiles)."""
    B, H, Tq, _ = Q.shape
    out = np.empty((B, H, Tq, V.shape[3]), Q.dtype)
    lse = np.empty((B, H, Tq), Q.dtype)
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        _head_forward(Q[b, h], K[b, h], V[b, h], mask[b], causal, scale, bq, bk, out[b, h], lse[b, h])
    return out, lse


# ------------------------------------------------------------------------------------------- backward
@njit(cache=True)
def _backward_tile(S, dO, Q, K, Vt, L, Di, q0, k0, nq, nk, scale, dQ, dKj, dVj, dP, tq, tk):
    """Given the masked score tile S, add this tile's share to dQ[q0:], dKj and dVj (FA-2, Algorithm 2)."""
    zero = S.dtype.type(0)
    for i in range(nq):
        for j in range(nk):
            S[i, j] = np.exp(S[i, j] - L[q0 + i])        # P, recomputed from lse
            for e in range(dO.shape[1]):
                dVj[j, e] += S[i, j] * dO[q0 + i, e]     # dV += P^T dO
        dP[i, :nk] = zero
        for e in range(dO.shape[1]):
            g = dO[q0 + i, e]
            for j in range(nk):
                dP[i, j] += g * Vt[e, k0 + j]            # dP = dO V^T
        for j in range(nk):
            dP[i, j] = S[i, j] * (dP[i, j] - Di[q0 + i])  # dS = P (dP - D_i)
    for i in range(nq):                                  # dQ += scale * dS K
        tq[:] = zero
        for j in range(nk):
            for d in range(K.shape[1]):
                tq[d] += dP[i, j] * K[k0 + j, d]
        for d in range(K.shape[1]):
            dQ[q0 + i, d] += scale * tq[d]
    tk[:nk] = zero                                       # dK += scale * dS^T Q
    for i in range(nq):
        for j in range(nk):
            for d in range(Q.shape[1]):
                tk[j, d] += dP[i, j] * Q[q0 + i, d]
    for j in range(nk):
        for d in range(Q.shape[1]):
            dKj[j, d] += scale * tk[j, d]


@njit(cache=True)
def _head_backward(dO, Q, K, V, O, L, mask, causal, scale, bq, bk, dQ, dK, dV):
    """One (batch, head): FlashAttention-2 Algorithm 2, key blocks outer, query blocks inner."""
    Tq, D = Q.shape
    Tk, Dv = K.shape[0], V.shape[1]
    Kt = np.ascontiguousarray(K.T)                       # (D, Tk)
    Vt = np.ascontiguousarray(V.T)                       # (Dv, Tk)
    Di = np.zeros(Tq, Q.dtype)                           # rowsum(dO * O) = rowsum(P * dP)
    Lf = np.empty(Tq, Q.dtype)
    for i in range(Tq):
        for e in range(Dv):
            Di[i] += dO[i, e] * O[i, e]
        Lf[i] = L[i] if np.isfinite(L[i]) else 0         # -inf (no key): P = exp(-inf) = 0
    S, dP = np.empty((bq, bk), Q.dtype), np.empty((bq, bk), Q.dtype)
    dKj, dVj = np.empty((bk, D), Q.dtype), np.empty((bk, Dv), Q.dtype)
    tq, tk = np.empty(D, Q.dtype), np.empty((bk, D), Q.dtype)
    dQ[:] = 0
    for k0 in range(0, Tk, bk):
        k1 = min(k0 + bk, Tk)
        dKj[:] = 0
        dVj[:] = 0
        for q0 in range(0, Tq, bq):
            q1 = min(q0 + bq, Tq)
            if _above_diagonal(q1, k0, Tq, Tk, causal):
                continue                                 # these queries see none of this key block
            _scores(Q, Kt, mask, q0, q1, k0, k1, causal, Tk - Tq, scale, S)
            _backward_tile(S, dO, Q, K, Vt, Lf, Di, q0, k0, q1 - q0, k1 - k0, scale, dQ, dKj, dVj, dP, tq, tk)
        dK[k0:k1] = dKj[:k1 - k0]
        dV[k0:k1] = dVj[:k1 - k0]


@njit(parallel=True, cache=True)
def _flash_backward(dO, Q, K, V, O, L, mask, causal, scale, bq, bk):
    """Parallel over (batch, head); each head's dQ, dK, dV have one writer."""
    B, H = Q.shape[:2]
    dQ, dK, dV = np.empty_like(Q), np.empty_like(K), np.empty_like(V)
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        _head_backward(dO[b, h], Q[b, h], K[b, h], V[b, h], O[b, h], L[b, h], mask[b], causal, scale, bq, bk,
                       dQ[b, h], dK[b, h], dV[b, h])
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
