"""numba attention: FlashAttention-2 forward and backward, tile products through BLAS, the rest fused in numba.

Mirrors refimpl/kernels/attention.py (`attention`, `attention_tiled` and their backwards): same arguments,
dtypes in and out, masks and errors (the reference's own input checks are reused). Both forms of the
interface run one algorithm: FlashAttention-2's walk over (bq, bk) tiles with the online softmax (Dao 2023,
arXiv 2307.08691, Algorithms 1 and 2). Its results equal the plain form's within the tolerance table.

How it is made fast on a few cores (what torch's CPU flash attention does too: one fused kernel per
direction, blocked for cache):
- One numba kernel per direction (`_forward`, `_backward`). The (batch, head) rows are cut into one run per
  thread (`_cuts`: equal work, counted in key tiles, so padded rows weigh less), and each thread walks its rows
  one at a time, tile by tile: a tile's scores, running max and sum and accumulator (at most 64 x 64) stay in
  its own buffers, in cache, from the first product to the last. Key tiles that are padding in the row are
  skipped.
- The tile products go to OpenBLAS's gemm, called from inside the kernel (_blas.py): numba's hand-written
  product loops reach 20-40 GFLOP/s per core where BLAS reaches 90-160. Where NumPy's BLAS is not OpenBLAS,
  the kernels are the reference's.
- Everything elementwise between the products (scale, causal and padding masks, row max, exp, row sums,
  the online-softmax rescaling, dS = P (dP - D_i)) is one branch-free pass per tile, with a vectorised
  float32 exp (_vmath.py): the NumPy reference makes five to eight temporaries there.
- The tile side is capped at 64 (`_tile`): block_size is an upper bound here, and the plain form
  (block_size=None) is tiled too.

Conventions are the reference's: key_padding_mask (B, Tk) True = padding; causal lets query i see keys
j <= i + (Tk - Tq); a query row with no visible key gets out = 0, lse = -inf and zero gradients.
"""
import numpy as np
from numba import get_num_threads, njit, prange

from refimpl.kernels import attention as ref

from . import _blas
from ._blas import NO_TRANS, ROW_MAJOR, TRANS
from ._vmath import vexp

TILE = 64                 # the largest tile side
_FMA = {"contract"}       # a * b + c as one fused multiply-add in the tile passes (and in the exp): 22% faster
_SERIAL_BLAS_MNK = 2**18  # OpenBLAS computes a GEMM with m*n*k up to this on the calling thread (interface/gemm.c)


def _tile(block_size, Tq, Tk, D):
    """(bq, bk): block_size capped at TILE, halved until one tile product is one OpenBLAS would run on the calling
    thread anyway (large head dimensions: the tiles stay in cache)."""
    t = TILE if block_size is None else min(block_size, TILE)
    while t > 8 and t * t * D > _SERIAL_BLAS_MNK:
        t //= 2
    return min(t, Tq), min(t, Tk)


@njit(inline="always")
def _visible_keys(q, k0, bk, causal, offset):
    """How many keys of the tile starting at k0 query q may see by the causal rule (the rest: above the diagonal)."""
    return max(0, min(bk, q + offset - k0 + 1)) if causal else bk


@njit(inline="always")
def _max8(s, n, init):
    """max(init, s[:n]) in eight independent chains: one chain waits on each max, eight keep the core busy."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = init
    j = 0
    while j + 8 <= n:
        m0, m1, m2, m3 = max(m0, s[j]), max(m1, s[j + 1]), max(m2, s[j + 2]), max(m3, s[j + 3])
        m4, m5, m6, m7 = max(m4, s[j + 4]), max(m5, s[j + 5]), max(m6, s[j + 6]), max(m7, s[j + 7])
        j += 8
    while j < n:
        m0 = max(m0, s[j])
        j += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@njit(inline="always")
def _sum8(s, n, zero):
    """sum(s[:n]) in eight partial sums (as _max8; the order differs from NumPy's pairwise sum by rounding)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
    j = 0
    while j + 8 <= n:
        a0, a1, a2, a3 = a0 + s[j], a1 + s[j + 1], a2 + s[j + 2], a3 + s[j + 3]
        a4, a5, a6, a7 = a4 + s[j + 4], a5 + s[j + 5], a6 + s[j + 6], a7 + s[j + 7]
        j += 8
    while j < n:
        a0 += s[j]
        j += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


# -------------------------------------------------------------------------------------------- forward
@njit(nogil=True, cache=True, error_model="numpy", fastmath=_FMA)
def _online_softmax_tile(S, pad, q0, k0, causal, offset, scale, m, l, acc):
    """Fold the raw score tile S = Q_i K_j^T (N, bq, bk) into the running max m and sum l (N, bq) of each
    query row, and re-base the accumulator acc (N, bq, Dv) to the new max: S becomes P = exp(scale S - m_new)
    (0 where hidden); a row's old sums are scaled by alpha = exp(m_old - m_new) (0 while m was -inf).
    pad (N, Tk): True = padding. Every loop below is branch-free, so LLVM vectorises it."""
    N, bq, bk = S.shape
    zero = S.dtype.type(0)
    ninf = S.dtype.type(-np.inf)
    for n in range(N):
        padk = pad[n, k0:k0 + bk]
        for i in range(bq):
            s = S[n, i]
            nv = _visible_keys(q0 + i, k0, bk, causal, offset)
            for j in range(nv):
                s[j] = ninf if padk[j] else scale * s[j]
            mx = _max8(s, nv, m[n, i])
            m_safe = mx if np.isfinite(mx) else zero     # no key seen yet: shift by 0, exp(-inf) = 0
            for j in range(nv):
                s[j] = vexp(s[j] - m_safe)
            for j in range(nv, bk):
                s[j] = zero
            alpha = vexp(m[n, i] - m_safe)
            l[n, i] = alpha * l[n, i] + _sum8(s, nv, zero)
            m[n, i] = mx
            a = acc[n, i]
            for e in range(a.shape[0]):
                a[e] *= alpha


@njit(nogil=True, cache=True, error_model="numpy")
def _normalise(acc, m, l, out, lse):
    """out = acc / l, lse = m + log(l); rows with no visible key (l == 0): out 0, lse -inf."""
    N, bq, Dv = acc.shape
    for n in range(N):
        for i in range(bq):
            has_keys = l[n, i] > 0
            for e in range(Dv):
                out[n, i, e] = acc[n, i, e] / l[n, i] if has_keys else 0
            mi = m[n, i] if np.isfinite(m[n, i]) else 0
            lse[n, i] = mi + np.log(l[n, i]) if has_keys else -np.inf


@njit(inline="always")
def _dead(pad, b, k0, k1):
    """Are keys [k0, k1) of batch row b all padding (a tile nobody sees)?"""
    for j in range(k0, k1):
        if not pad[b, j]:
            return False
    return True


@njit(inline="always")
def _ld(a):
    """Elements between consecutive rows of a (B, H, T, X) array's (T, X) matrices: BLAS's leading dimension."""
    return a.strides[2] // a.itemsize


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _forward(gemm, Q, K, V, pad, out, lse, cuts, causal, scale, bq, bk):
    """FlashAttention-2 Algorithm 1, one (batch, head) row at a time: Q (B, H, Tq, D), K (B, H, Tk, D),
    V (B, H, Tk, Dv), pad (B, Tk); writes out (B, H, Tq, Dv) and lse (B, H, Tq). The arrays may be strided
    (a (B, T, H, D) buffer seen as (B, H, T, D): the model's head transposes stay views) as long as their last
    axis is contiguous. Thread c takes rows [cuts[c], cuts[c+1]) of the B*H; a tile's scores, running max and
    sum and accumulator stay in its own small buffers (in cache) from the first product to the last."""
    H, Tq, D = Q.shape[1:]
    Tk, Dv = K.shape[2], V.shape[3]
    one, zero = Q.dtype.type(1), Q.dtype.type(0)
    for c in prange(len(cuts) - 1):
        S = np.empty(bq * bk, Q.dtype)
        m, l, acc = np.empty(bq, Q.dtype), np.empty(bq, Q.dtype), np.empty(bq * Dv, Q.dtype)
        for n in range(cuts[c], cuts[c + 1]):
            b, h = n // H, n % H
            for q0 in range(0, Tq, bq):
                nq = min(bq, Tq - q0)
                m[:], l[:], acc[:] = -np.inf, 0, 0
                for k0 in range(0, Tk, bk):
                    if causal and k0 > q0 + nq - 1 + (Tk - Tq):
                        break                            # above the diagonal, and so is every later key tile
                    nk = min(bk, Tk - k0)
                    if _dead(pad, b, k0, k0 + nk):
                        continue                         # padding only: exp(-inf) = 0 adds nothing
                    gemm(ROW_MAJOR, NO_TRANS, TRANS, nq, nk, D, one, Q[b, h, q0:].ctypes, _ld(Q),
                         K[b, h, k0:].ctypes, _ld(K), zero, S.ctypes, nk)          # S = Q_i K_j^T
                    _online_softmax_tile(S[:nq * nk].reshape((1, nq, nk)), pad[b:b + 1], q0, k0, causal,
                                         Tk - Tq, scale, m[:nq].reshape((1, nq)), l[:nq].reshape((1, nq)),
                                         acc[:nq * Dv].reshape((1, nq, Dv)))
                    gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, nq, Dv, nk, one, S.ctypes, nk, V[b, h, k0:].ctypes, _ld(V),
                         one, acc.ctypes, Dv)            # acc += P V_j
                _normalise(acc[:nq * Dv].reshape((1, nq, Dv)), m[:nq].reshape((1, nq)), l[:nq].reshape((1, nq)),
                           out[b, h:h + 1, q0:q0 + nq], lse[b, h:h + 1, q0:q0 + nq])


# ------------------------------------------------------------------------------------------- backward
@njit(nogil=True, cache=True, error_model="numpy", fastmath=_FMA)
def _ds_tile(S, dP, pad, q0, k0, causal, offset, scale, L, Di):
    """Given the raw score tile S = Q_i K_j^T and dP = dO_i V_j^T (N, bq, bk): S becomes
    P = exp(scale S - L) (0 where hidden), dP becomes scale * dS = scale * P (dP - D_i). L: lse with -inf as 0."""
    N, bq, bk = S.shape
    zero = S.dtype.type(0)
    ninf = S.dtype.type(-np.inf)
    for n in range(N):
        padk = pad[n, k0:k0 + bk]
        for i in range(bq):
            s, dp = S[n, i], dP[n, i]
            Li, Dii = L[n, q0 + i], Di[n, q0 + i]
            nv = _visible_keys(q0 + i, k0, bk, causal, offset)
            for j in range(nv):                          # vectorises
                p = vexp((ninf if padk[j] else scale * s[j]) - Li)
                s[j] = p
                dp[j] = scale * (p * (dp[j] - Dii))
            for j in range(nv, bk):
                s[j] = zero
                dp[j] = zero


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _backward(gemm, dO, Q, K, V, O, L, pad, dQ, dK, dV, cuts, causal, scale, bq, bk):
    """FlashAttention-2 Algorithm 2, one (batch, head) row at a time (shapes and strides as `_forward`); L is lse
    with -inf as 0 (P = 0 there)."""
    H, Tq, D = Q.shape[1:]
    Tk, Dv = K.shape[2], V.shape[3]
    one, zero = Q.dtype.type(1), Q.dtype.type(0)
    Di = np.empty(L.shape, Q.dtype)
    for c in prange(len(cuts) - 1):
        S, dP = np.empty(bq * bk, Q.dtype), np.empty(bq * bk, Q.dtype)
        for n in range(cuts[c], cuts[c + 1]):
            b, h = n // H, n % H
            for i in range(Tq):                          # D_i = rowsum(dO * O) = rowsum(P * dP)
                d = zero
                for e in range(Dv):
                    d += dO[b, h, i, e] * O[b, h, i, e]
                Di[b, h, i] = d
            dQ[b, h], dK[b, h], dV[b, h] = 0, 0, 0
            for k0 in range(0, Tk, bk):
                nk = min(bk, Tk - k0)
                if _dead(pad, b, k0, k0 + nk):
                    continue                             # padded keys: no gradient
                for q0 in range(0, Tq, bq):
                    nq = min(bq, Tq - q0)
                    if causal and k0 > q0 + nq - 1 + (Tk - Tq):
                        continue                         # these queries see none of this key tile
                    gemm(ROW_MAJOR, NO_TRANS, TRANS, nq, nk, D, one, Q[b, h, q0:].ctypes, _ld(Q),
                         K[b, h, k0:].ctypes, _ld(K), zero, S.ctypes, nk)          # S = Q_i K_j^T
                    gemm(ROW_MAJOR, NO_TRANS, TRANS, nq, nk, Dv, one, dO[b, h, q0:].ctypes, _ld(dO),
                         V[b, h, k0:].ctypes, _ld(V), zero, dP.ctypes, nk)         # dP = dO_i V_j^T
                    _ds_tile(S[:nq * nk].reshape((1, nq, nk)), dP[:nq * nk].reshape((1, nq, nk)), pad[b:b + 1],
                             q0, k0, causal, Tk - Tq, scale, L[b, h:h + 1], Di[b, h:h + 1])
                    gemm(ROW_MAJOR, TRANS, NO_TRANS, nk, Dv, nq, one, S.ctypes, nk, dO[b, h, q0:].ctypes, _ld(dO),
                         one, dV[b, h, k0:].ctypes, _ld(dV))                       # dV_j += P^T dO_i
                    gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, nq, D, nk, one, dP.ctypes, nk, K[b, h, k0:].ctypes, _ld(K),
                         one, dQ[b, h, q0:].ctypes, _ld(dQ))                       # dQ_i += scale dS K_j
                    gemm(ROW_MAJOR, TRANS, NO_TRANS, nk, D, nq, one, dP.ctypes, nk, Q[b, h, q0:].ctypes, _ld(Q),
                         one, dK[b, h, k0:].ctypes, _ld(dK))                       # dK_j += scale dS^T Q_i


# ------------------------------------------------------------------------------------ threads, wrappers
def _cuts(work, parts):
    """Cut the rows into at most `parts` runs of consecutive rows with about equal work (a row's work: the key
    tiles it walks, `_live_tiles`): the smallest largest run, found by bisection on it with greedy packing."""
    N = len(work)
    if work.min() == work.max():                         # no padding to balance: equal runs
        return [int(c) for c in np.linspace(0, N, min(parts, N) + 1)]

    def pack(cap):
        cuts, total = [0], 0
        for n in range(N):
            if total + work[n] > cap:
                cuts.append(n)
                total = 0
            total += work[n]
        return cuts + [N]

    lo, hi = int(work.max()), int(work.sum())
    while lo < hi:
        mid = (lo + hi) // 2
        if len(pack(mid)) - 1 <= parts:
            hi = mid
        else:
            lo = mid + 1
    return pack(lo)


def _live_tiles(mask, bk):
    """How many key tiles each row walks: those with a key that is not padding (at least 1: a row of padding
    still writes its zero output)."""
    tiles = -(-mask.shape[1] // bk)
    live = np.zeros((mask.shape[0], tiles * bk), np.bool_)
    live[:, :mask.shape[1]] = ~mask
    return np.maximum(live.reshape(len(live), tiles, bk).any(axis=2).sum(axis=1), 1)


def _prepare(q, k, v, key_padding_mask, block_size):
    """Checks as the reference; returns (compute dtype, D, mask (B, Tk) bool, tile (bq, bk))."""
    bs = 1 if block_size is None else block_size
    B, H, Tq, Tk, D = ref._check_inputs(q, k, v, key_padding_mask, bs, bs)
    dt = ref._compute_dtype(q, k, v)
    mask = (np.zeros((B, Tk), np.bool_) if key_padding_mask is None
            else np.ascontiguousarray(key_padding_mask, np.bool_))
    return dt, D, mask, _tile(block_size, Tq, Tk, max(D, v.shape[3]))


def _rows(a, dt):
    """a (B, H, T, X) as the kernels take it, a copy only where needed: the compute dtype, the last axis
    contiguous, and each (T, X) matrix rows of BLAS's kind (a leading dimension of at least X; no negative or
    broadcast strides)."""
    item = np.dtype(dt).itemsize
    st = a.strides
    if (a.dtype == dt and st[3] == item and st[2] >= item * max(1, a.shape[3]) and st[0] >= 0 and st[1] >= 0
            and all(x % item == 0 for x in st)):
        return a
    return np.ascontiguousarray(a, dtype=dt)


def _like(a, shape, dt):
    """An empty (B, H, T, X) array whose (B, H, T) axes lie in memory in the order a's do: for q seen through
    the model's head transpose, out is too, and the transpose back is a view."""
    order = sorted(range(3), key=lambda i: -a.strides[i])
    buf = np.empty([shape[i] for i in order] + [shape[3]], dt)
    return buf.transpose(*[order.index(i) for i in range(3)], 3)


def _row_cuts(mask, H, bk):
    """The B*H rows cut into one run per thread, by work (_cuts); a row's extent is its batch row's."""
    return np.array(_cuts(np.repeat(_live_tiles(mask, bk), H), get_num_threads()), np.int64)


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, block_size=None):
    """Mirrors the reference `attention` (block_size=None) and `attention_tiled` (square blocks):
    returns (out (B, H, Tq, Dv) in q.dtype, lse (B, H, Tq) in the compute dtype)."""
    dt, D, mask, (bq, bk) = _prepare(q, k, v, key_padding_mask, block_size)
    gemm = _blas.gemm(dt)
    if gemm is None:                                     # NumPy's BLAS is not OpenBLAS: the reference's own
        kw = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        return (ref.attention(q, k, v, **kw) if block_size is None else
                ref.attention_tiled(q, k, v, block_q=block_size, block_k=block_size, **kw))
    B, H, Tq, _ = q.shape
    Q, K, V = (_rows(a, dt) for a in (q, k, v))
    out, lse = _like(Q, (B, H, Tq, V.shape[3]), dt), np.empty((B, H, Tq), dt)
    _forward(gemm, Q, K, V, mask, out, lse, _row_cuts(mask, H, bk), bool(causal), ref._scale(scale, D, dt), bq, bk)
    return out.astype(q.dtype, copy=False), lse


def attention_backward(dout, q, k, v, out, lse, *, causal=False, key_padding_mask=None, scale=None,
                       block_size=None):
    """Mirrors the reference `attention_backward` / `attention_tiled_backward`: returns (dq, dk, dv) in
    q's, k's and v's dtypes."""
    dt, D, mask, (bq, bk) = _prepare(q, k, v, key_padding_mask, block_size)
    ref._check_backward_inputs(dout, out, lse, q, v)
    gemm = _blas.gemm(dt)
    if gemm is None:
        kw = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        return (ref.attention_backward(dout, q, k, v, out, lse, **kw) if block_size is None else
                ref.attention_tiled_backward(dout, q, k, v, out, lse, block_q=block_size, block_k=block_size, **kw))
    dO, Q, K, V, O = (_rows(a, dt) for a in (dout, q, k, v, out))
    L = np.asarray(lse, dtype=dt)
    L = np.where(np.isfinite(L), L, 0).astype(dt, copy=False)   # -inf (no key): P = exp(-inf) = 0
    dQ, dK, dV = _like(Q, Q.shape, dt), _like(K, K.shape, dt), _like(V, V.shape, dt)
    _backward(gemm, dO, Q, K, V, O, L, mask, dQ, dK, dV, _row_cuts(mask, q.shape[1], bk), bool(causal),
              ref._scale(scale, D, dt), bq, bk)
    return dQ.astype(q.dtype, copy=False), dK.astype(k.dtype, copy=False), dV.astype(v.dtype, copy=False)
