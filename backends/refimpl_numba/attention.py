"""numba attention: FlashAttention-2 forward and backward, tile products through BLAS, the rest fused in numba.

Mirrors refimpl/kernels/attention.py (`attention`, `attention_tiled` and their backwards): same arguments,
dtypes in and out, masks and errors (the reference's own input checks are reused). Both forms of the
interface run one algorithm: FlashAttention-2's walk over (bq, bk) tiles with the online softmax (Dao 2023,
arXiv 2307.08691, Algorithms 1 and 2). Its results equal the plain form's within the tolerance table.

How it is made fast on a few cores:
- The tile products go to NumPy's batched `@` (BLAS): numba's hand-written product loops reach 20-40
  GFLOP/s per core where BLAS reaches 90-160.
- Everything elementwise between the products (scale, causal and padding masks, row max, exp, row sums,
  the online-softmax rescaling, dS = P (dP - D_i)) is one numba pass per tile, with a vectorised float32
  exp (_vmath.py): the NumPy reference makes five to eight temporaries there.
- The parallelism is across (batch, head): the B*H rows are cut into one run per thread (`_cuts`: equal
  work, counted in key tiles, so padded rows weigh less), and each thread walks its run's tiles (the numba
  passes release the GIL, and so does BLAS; _threads.py). Key tiles that are padding in every row of a run
  are skipped. A tile product is at most 64 x 64 x 64 (`_tile`), which OpenBLAS runs on the calling thread:
  larger products start OpenBLAS's own threads, and two callers' pools spinning against each other made a
  causal 1024-token pass 15x slower on 2 cores. So `block_size` is an upper bound here, and the plain form
  (`block_size=None`) is tiled too.
- Q K^T multiplies compact copies of the key tiles (`_key_tiles`): read in place from K^T, a tile's rows are
  Tk apart, and BLAS ran at half speed.

Conventions are the reference's: key_padding_mask (B, Tk) True = padding; causal lets query i see keys
j <= i + (Tk - Tq); a query row with no visible key gets out = 0, lse = -inf and zero gradients.
"""
import numpy as np
from numba import get_num_threads, njit

from refimpl.kernels import attention as ref

from ._threads import in_chunks
from ._vmath import vexp

TILE = 64                 # the largest tile side
_FMA = {"contract"}       # a * b + c as one fused multiply-add in the tile passes (and in the exp): 22% faster
_SERIAL_BLAS_MNK = 2**18  # OpenBLAS computes a GEMM with m*n*k up to this on the calling thread (interface/gemm.c)


def _T(a):  # transpose the last two axes: (..., m, n) -> (..., n, m)
    return a.swapaxes(-1, -2)


def _tile(block_size, Tq, Tk, D):
    """(bq, bk): block_size capped at TILE, halved until one tile product stays on the calling thread."""
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


def _key_tiles(K, bk):
    """(N, Tk, D) -> (N, ceil(Tk / bk), D, bk): each tile of bk keys transposed and contiguous (zero past Tk).
    Q_i K_j^T then multiplies two compact blocks. Read in place from K^T, the (D, bk) tile has rows Tk apart,
    which put every row in the same cache sets (at Tk = 1024 fp32, 4 KiB apart): BLAS ran at half speed."""
    N, Tk, D = K.shape
    tiles = -(-Tk // bk)
    padded = np.zeros((N, tiles * bk, D), K.dtype)
    padded[:, :Tk] = K
    return np.ascontiguousarray(_T(padded.reshape(N, tiles, bk, D)))


def _live_tiles(pad, bk):
    """For each tile of bk keys: does any row of the chunk see one of them (not padding)?"""
    return [not pad[:, k0:k0 + bk].all() for k0 in range(0, pad.shape[1], bk)]


def _forward(Q, K, V, pad, out, lse, causal, scale, bq, bk):
    """FlashAttention-2 Algorithm 1 over (bq, bk) tiles of the N rows of one chunk: Q (N, Tq, D), K (N, Tk, D),
    V (N, Tk, Dv), pad (N, Tk); writes out (N, Tq, Dv) and lse (N, Tq)."""
    N, Tq, _ = Q.shape
    Tk, Dv = K.shape[1], V.shape[2]
    Kt, live = _key_tiles(K, bk), _live_tiles(pad, bk)
    for q0 in range(0, Tq, bq):
        q1 = min(q0 + bq, Tq)
        m = np.full((N, q1 - q0), -np.inf, Q.dtype)
        l = np.zeros((N, q1 - q0), Q.dtype)
        acc = np.zeros((N, q1 - q0, Dv), Q.dtype)
        for k0 in range(0, Tk, bk):
            if ref._above_diagonal(q1, k0, Tq, Tk, causal):
                break                                    # and so is every later key block
            if not live[k0 // bk]:
                continue                                 # padding in every row: exp(-inf) = 0 adds nothing
            k1 = min(k0 + bk, Tk)
            S = Q[:, q0:q1] @ Kt[:, k0 // bk, :, :k1 - k0]  # (N, bq, bk), BLAS
            _online_softmax_tile(S, pad, q0, k0, causal, Tk - Tq, scale, m, l, acc)
            acc += S @ V[:, k0:k1]                       # (N, bq, Dv)
        _normalise(acc, m, l, out[:, q0:q1], lse[:, q0:q1])


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


def _backward(dO, Q, K, V, O, L, pad, dQ, dK, dV, causal, scale, bq, bk):
    """FlashAttention-2 Algorithm 2 over (bq, bk) tiles of the N rows of one chunk (shapes as `_forward`)."""
    Tq, Tk = Q.shape[1], K.shape[1]
    Di = (dO * O).sum(axis=-1)                           # (N, Tq) = rowsum(P * dP)
    L = np.where(np.isfinite(L), L, 0).astype(Q.dtype, copy=False)  # -inf (no key): P = exp(-inf) = 0
    Kt, Vt, live = _key_tiles(K, bk), _key_tiles(V, bk), _live_tiles(pad, bk)
    dQ[...] = 0
    for k0 in range(0, Tk, bk):
        k1 = min(k0 + bk, Tk)
        Kj, dKj, dVj = K[:, k0:k1], dK[:, k0:k1], dV[:, k0:k1]
        Ktj, Vtj = Kt[:, k0 // bk, :, :k1 - k0], Vt[:, k0 // bk, :, :k1 - k0]
        dKj[...], dVj[...] = 0, 0
        if not live[k0 // bk]:
            continue                                     # padded keys in every row: no gradient
        for q0 in range(0, Tq, bq):
            q1 = min(q0 + bq, Tq)
            if ref._above_diagonal(q1, k0, Tq, Tk, causal):
                continue                                 # these queries see none of this key block
            Qi, dOi = Q[:, q0:q1], dO[:, q0:q1]
            S = Qi @ Ktj                                 # (N, bq, bk), BLAS
            dP = dOi @ Vtj                               # (N, bq, bk)
            _ds_tile(S, dP, pad, q0, k0, causal, Tk - Tq, scale, L, Di)
            dVj += _T(S) @ dOi                           # dV += P^T dO
            dQ[:, q0:q1] += dP @ Kj                      # dQ += scale dS K
            dKj += _T(dP) @ Qi                           # dK += scale dS^T Q


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
    B, H, Tq, _ = q.shape
    Q, K, V = (_rows(a, dt) for a in (q, k, v))
    out, lse = np.empty((B * H, Tq, V.shape[2]), dt), np.empty((B * H, Tq), dt)
    in_chunks(_forward, _cuts(_extent(mask, bk), get_num_threads()), (Q, K, V, mask, out, lse), bool(causal),
              ref._scale(scale, D, dt), bq, bk)
    return out.reshape(B, H, Tq, -1).astype(q.dtype, copy=False), lse.reshape(B, H, Tq)


def attention_backward(dout, q, k, v, out, lse, *, causal=False, key_padding_mask=None, scale=None,
                       block_size=None):
    """Mirrors the reference `attention_backward` / `attention_tiled_backward`: returns (dq, dk, dv) in
    q's, k's and v's dtypes."""
    dt, D, mask, (bq, bk) = _prepare(q, k, v, key_padding_mask, block_size)
    ref._check_backward_inputs(dout, out, lse, q, v)
    dO, Q, K, V, O = (_rows(a, dt) for a in (dout, q, k, v, out))
    L = np.ascontiguousarray(lse, dtype=dt).reshape(-1, lse.shape[2])
    dQ, dK, dV = np.empty_like(Q), np.empty_like(K), np.empty_like(V)
    in_chunks(_backward, _cuts(_extent(mask, bk), get_num_threads()), (dO, Q, K, V, O, L, mask, dQ, dK, dV),
              bool(causal), ref._scale(scale, D, dt), bq, bk)
    return (dQ.reshape(q.shape).astype(q.dtype, copy=False), dK.reshape(k.shape).astype(k.dtype, copy=False),
            dV.reshape(v.shape).astype(v.dtype, copy=False))

