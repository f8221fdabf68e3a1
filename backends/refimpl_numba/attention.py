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
def _dead(pad, n, k0, k1):
    """Are keys [k0, k1) of row n all padding (a tile nobody sees)?"""
    for j in range(k0, k1):
        if not pad[n, j]:
            return False
    return True


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _forward(gemm, Q, K, V, pad, out, lse, cuts, causal, scale, bq, bk):
    """FlashAttention-2 Algorithm 1, row by row: Q (N, Tq, D), K (N, Tk, D), V (N, Tk, Dv), pad (N, Tk); writes
    out (N, Tq, Dv) and lse (N, Tq). Thread c takes rows [cuts[c], cuts[c+1]); a tile's scores, running max and
    sum and accumulator stay in its own small buffers (in cache) from the first product to the last."""
    N, Tq, D = Q.shape
    Tk, Dv = K.shape[1], V.shape[2]
    one, zero = Q.dtype.type(1), Q.dtype.type(0)
    for c in prange(len(cuts) - 1):
        S = np.empty(bq * bk, Q.dtype)
        m, l, acc = np.empty(bq, Q.dtype), np.empty(bq, Q.dtype), np.empty(bq * Dv, Q.dtype)
        for n in range(cuts[c], cuts[c + 1]):
            for q0 in range(0, Tq, bq):
                nq = min(bq, Tq - q0)
                m[:], l[:], acc[:] = -np.inf, 0, 0
                for k0 in range(0, Tk, bk):
                    if causal and k0 > q0 + nq - 1 + (Tk - Tq):
                        break                            # above the diagonal, and so is every later key tile
                    nk = min(bk, Tk - k0)
                    if _dead(pad, n, k0, k0 + nk):
                        continue                         # padding only: exp(-inf) = 0 adds nothing
                    gemm(ROW_MAJOR, NO_TRANS, TRANS, nq, nk, D, one, Q[n, q0:].ctypes, D, K[n, k0:].ctypes, D,
                         zero, S.ctypes, nk)                # S = Q_i K_j^T
                    _online_softmax_tile(S[:nq * nk].reshape((1, nq, nk)), pad[n:n + 1], q0, k0, causal,
                                         Tk - Tq, scale, m[:nq].reshape((1, nq)), l[:nq].reshape((1, nq)),
                                         acc[:nq * Dv].reshape((1, nq, Dv)))
                    gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, nq, Dv, nk, one, S.ctypes, nk, V[n, k0:].ctypes, Dv,
                         one, acc.ctypes, Dv)            # acc += P V_j
                _normalise(acc[:nq * Dv].reshape((1, nq, Dv)), m[:nq].reshape((1, nq)), l[:nq].reshape((1, nq)),
                           out[n:n + 1, q0:q0 + nq], lse[n:n + 1, q0:q0 + nq])


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
    """FlashAttention-2 Algorithm 2, row by row (shapes as `_forward`); L is lse with -inf as 0 (P = 0 there)."""
    N, Tq, D = Q.shape
    Tk, Dv = K.shape[1], V.shape[2]
    one, zero = Q.dtype.type(1), Q.dtype.type(0)
    Di = np.empty((N, Tq), Q.dtype)
    for c in prange(len(cuts) - 1):
        S, dP = np.empty(bq * bk, Q.dtype), np.empty(bq * bk, Q.dtype)
        for n in range(cuts[c], cuts[c + 1]):
            for i in range(Tq):                          # D_i = rowsum(dO * O) = rowsum(P * dP)
                d = zero
                for e in range(Dv):
                    d += dO[n, i, e] * O[n, i, e]
                Di[n, i] = d
            dQ[n], dK[n], dV[n] = 0, 0, 0
            for k0 in range(0, Tk, bk):
                nk = min(bk, Tk - k0)
                if _dead(pad, n, k0, k0 + nk):
                    continue                             # padded keys: no gradient
                for q0 in range(0, Tq, bq):
                    nq = min(bq, Tq - q0)
                    if causal and k0 > q0 + nq - 1 + (Tk - Tq):
                        continue                         # these queries see none of this key tile
                    gemm(ROW_MAJOR, NO_TRANS, TRANS, nq, nk, D, one, Q[n, q0:].ctypes, D, K[n, k0:].ctypes, D,
                         zero, S.ctypes, nk)                # S = Q_i K_j^T
                    gemm(ROW_MAJOR, NO_TRANS, TRANS, nq, nk, Dv, one, dO[n, q0:].ctypes, Dv, V[n, k0:].ctypes, Dv,
                         zero, dP.ctypes, nk)               # dP = dO_i V_j^T
                    _ds_tile(S[:nq * nk].reshape((1, nq, nk)), dP[:nq * nk].reshape((1, nq, nk)), pad[n:n + 1],
                             q0, k0, causal, Tk - Tq, scale, L[n:n + 1], Di[n:n + 1])
                    gemm(ROW_MAJOR, TRANS, NO_TRANS, nk, Dv, nq, one, S.ctypes, nk, dO[n, q0:].ctypes, Dv,
                         one, dV[n, k0:].ctypes, Dv)     # dV_j += P^T dO_i
                    gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, nq, D, nk, one, dP.ctypes, nk, K[n, k0:].ctypes, D,
                         one, dQ[n, q0:].ctypes, D)      # dQ_i += scale dS K_j
                    gemm(ROW_MAJOR, TRANS, NO_TRANS, nk, D, nq, one, dP.ctypes, nk, Q[n, q0:].ctypes, D,
                         one, dK[n, k0:].ctypes, D)      # dK_j += scale dS^T Q_i


# ------------------------------------------------------------------------------------ threads, wrappers
def _cuts(extent, parts):
    """Cut the rows into at most `parts` runs of about equal work. A run walks every key tile that any of its
    rows sees, so its work is (rows) x (the largest extent among them): the smallest such bottleneck, found by
    bisection on it with greedy packing."""
    N = len(extent)
    if extent.min() == extent.max():                     # no padding to balance: equal runs
        return [int(c) for c in np.linspace(0, N, min(parts, N) + 1)]

    def pack(cap):
        cuts, lo, top = [0], 0, 0
        for n in range(N):
            top = max(top, extent[n])
            if (n + 1 - lo) * top > cap:
                cuts.append(n)
                lo, top = n, extent[n]
        return cuts + [N]

    lo, hi = int(extent.max()), int(N * extent.max())
    while lo < hi:
        mid = (lo + hi) // 2
        if len(pack(mid)) - 1 <= parts:
            hi = mid
        else:
            lo = mid + 1
    return pack(lo)


def _extent(mask, bk):
    """How many key tiles each row walks: up to its last tile with a key that is not padding (at least 1)."""
    tiles = -(-mask.shape[1] // bk)
    live = np.zeros((mask.shape[0], tiles * bk), np.bool_)
    live[:, :mask.shape[1]] = ~mask
    live = live.reshape(len(live), tiles, bk).any(axis=2)
    last = tiles - np.argmax(live[:, ::-1], axis=1)     # 1 + the index of the last live tile
    return np.where(live.any(axis=1), last, 1)


def _prepare(q, k, v, key_padding_mask, block_size):
    """Checks as the reference; returns (compute dtype, D, mask (B*H, Tk) bool, tile (bq, bk))."""
    bs = 1 if block_size is None else block_size
    B, H, Tq, Tk, D = ref._check_inputs(q, k, v, key_padding_mask, bs, bs)
    dt = ref._compute_dtype(q, k, v)
    mask = (np.zeros((B * H, Tk), np.bool_) if key_padding_mask is None
            else np.repeat(np.asarray(key_padding_mask), H, axis=0))
    return dt, D, mask, _tile(block_size, Tq, Tk, max(D, v.shape[3]))


def _rows(a, dt):
    """(B, H, T, X) -> a C-contiguous (B*H, T, X) array of the compute dtype."""
    return np.ascontiguousarray(a, dtype=dt).reshape(-1, *a.shape[2:])


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, block_size=None):
    """Mirrors the reference `attention` (block_size=None) and `attention_tiled` (square blocks):
    returns (out (B, H, Tq, Dv) in q.dtype, lse (B, H, Tq) in the compute dtype)."""
    dt, D, mask, (bq, bk) = _prepare(q, k, v, key_padding_mask, block_size)
    gemm = _blas.gemm(dt)
    if gemm is None:                                     # NumPy's BLAS is not OpenBLAS: the reference's own
        return (ref.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
                if block_size is None else ref.attention_tiled(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                                               scale=scale, block_q=block_size, block_k=block_size))
    B, H, Tq, _ = q.shape
    Q, K, V = (_rows(a, dt) for a in (q, k, v))
    out, lse = np.empty((B * H, Tq, V.shape[2]), dt), np.empty((B * H, Tq), dt)
    _forward(gemm, Q, K, V, mask, out, lse, _cuts(_extent(mask, bk), get_num_threads()), bool(causal),
             ref._scale(scale, D, dt), bq, bk)
    return out.reshape(B, H, Tq, -1).astype(q.dtype, copy=False), lse.reshape(B, H, Tq)


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
    L = np.ascontiguousarray(lse, dtype=dt).reshape(-1, lse.shape[2])
    L = np.where(np.isfinite(L), L, 0).astype(dt, copy=False)   # -inf (no key): P = exp(-inf) = 0
    dQ, dK, dV = np.empty_like(Q), np.empty_like(K), np.empty_like(V)
    _backward(gemm, dO, Q, K, V, O, L, mask, dQ, dK, dV, _cuts(_extent(mask, bk), get_num_threads()), bool(causal),
              ref._scale(scale, D, dt), bq, bk)
    return (dQ.reshape(q.shape).astype(q.dtype, copy=False), dK.reshape(k.shape).astype(k.dtype, copy=False),
            dV.reshape(v.shape).astype(v.dtype, copy=False))
