"""Attention on the GPU, in the reference's two forms (refimpl/kernels/attention.py):

- block_size=None: the plain, readable form. The reference code itself runs on CuPy arrays in the
  compute dtype (its matmuls are cuBLAS GEMMs, TF32 off); only the up/down casts are ours.
- block_size=int: FlashAttention-2 (Dao 2023, Algorithms 1 and 2) as RawKernels (_flash_source.py): the forward
  keeps the online softmax per query row and never materialises the scores; the backward recomputes
  P = exp(S - lse) tile by tile, dK/dV per key block, dQ in a second pass (no atomics, deterministic).
  The kernels' tiles are fixed, so block_size only selects this form; it must still be a positive int, as
  in the reference. Head dims up to 128 (FA_MAXD); larger ones run the reference's tiled algorithm on CuPy
  arrays. float16/bfloat16 inputs run the tensor-core kernels (*_tc: mma.sync, fp32 accumulators and
  softmax statistics, cp.async double-buffered tiles; tile shapes in _source.TC_TILES); float32/float64 the
  CUDA-core ones (16 queries x 32 keys forward and for dQ, 32 x 32 for dK/dV).

Layouts. The CUDA-core kernels read and write (B, H, T, D)-contiguous arrays. The tensor-core ones take any
strides along B, H and T: inputs whose rows start on 16 bytes are read in place (the model's q, k, v are
(B, H, T, D) views of (B, T, H, D) arrays, refimpl/attention.py), and out, dq, dk, dv are written in
(B, T, H, D) order and returned as (B, H, T, D) views, so the model's head transposes copy nothing.

Masks and fully masked rows are exactly the reference's: out = 0, lse = -inf, zero gradients.
"""
import numpy as np

from refimpl.kernels import attention as ref

from . import _runtime as rt
from . import _source
from ._runtime import cupy, raw, scalar

MAX_HEAD_DIM = 128
_BQ, _BK = 16, 32  # FA_BQ, FA_BK in _flash_source.py
_TC_WARPS = 4  # TC_NW in _flash_source.py: a block's rows are 16 x m-tiles per warp x 4 warps


def _up_all(*arrays):
    return [rt.contiguous(rt.up(a)) for a in arrays]


def _mask_arg(key_padding_mask):
    cp = cupy()
    if key_padding_mask is None:
        return cp.zeros(1, cp.uint8), 0
    return rt.contiguous(cp.asarray(key_padding_mask)).view(cp.uint8), 1


def _use_kernel(D, Dv):
    return D <= MAX_HEAD_DIM and Dv <= MAX_HEAD_DIM


def _blocks(block_size):
    return () if block_size is None else (block_size, block_size)


def _inputs(*arrays):
    """The kernels' inputs in one storage dtype (mixed dtypes are upcast to the compute one): contiguous, or for
    the tensor-core kernels (16-bit floats) in place where their rows are aligned (_tc_input)."""
    if len({a.dtype for a in arrays}) > 1:
        return _up_all(*arrays)
    if np.dtype(arrays[0].dtype) in rt._TWO_BYTE_FLOATS:
        return [_tc_input(a) for a in arrays]
    return [rt.contiguous(a) for a in arrays]


def _byte_strides(x):
    """x's strides in bytes along its batch, head and sequence axes (0 on an axis of length 1: never stepped)."""
    (B, H, T, _), (sb, sh, st, _) = x.shape, x.strides
    return (sb if B > 1 else 0), (sh if H > 1 else 0), (st if T > 1 else 0)


def _strides(x):
    """The same in elements, as the kernels take them."""
    return tuple(s // x.itemsize for s in _byte_strides(x))


def _rows_aligned(x):
    """Whether every row of x (B, H, T, D) is unit-stride and starts on 16 bytes, as cp.async's 16-byte copies
    need: base address and batch, head, sequence strides multiples of 16 bytes, head-dim stride 1. (Called on
    every launch: plain integer arithmetic, no loops.)"""
    sb, sh, st = _byte_strides(x)
    return (x.shape[3] <= 1 or x.strides[3] == x.itemsize) and (x.data.ptr | sb | sh | st) % 16 == 0


def _tc_input(x):
    """x itself when its rows are aligned, else a contiguous copy (whose rows are, when D is a multiple of 8)."""
    return x if _rows_aligned(x) else rt.contiguous(x)


def _tc_arg(x):
    """A tensor-core kernel's arguments for x: the array (as uint16) and its batch, head, sequence strides."""
    return (raw(x),) + tuple(scalar(s, np.int64) for s in _strides(x))


def _tc_vec(D, Dv, *arrays):
    """The kernels' `vec`: tiles come by 16-byte cp.async (head dims multiples of 8, every row aligned), else by
    plain loads."""
    return scalar(D % 8 == 0 and Dv % 8 == 0 and all(_rows_aligned(a) for a in arrays), np.int32)


def _bthd_empty(B, H, T, D, dtype):
    """An uninitialised (B, H, T, D) array stored in (B, T, H, D) order: the (B, H, T, D) view of it, which the
    model's transpose(1, 2).reshape(B, T, H * D) turns back into a view."""
    return rt.empty((B, T, H, D), dtype).transpose(0, 2, 1, 3)


def _tc_head_dim(dtype, D, Dv):
    """The tensor-core kernels' padded head dim (MAXD) for 16-bit float inputs, else None (CUDA cores)."""
    if np.dtype(dtype) not in rt._TWO_BYTE_FLOATS:
        return None
    return 64 if max(D, Dv) <= 64 else 128


def _tc_tile_bytes(rows, maxd):
    return rows * (maxd + 8) * 2  # u16 rows padded by 8 halves (_flash_source.py's LD)


def _tc_tiles(kernel, maxd, tiles):
    """(m-tiles per warp, tile length) of a tensor-core kernel: `tiles` overrides _source.TC_TILES (benchmarks)."""
    return (tiles or {}).get(kernel) or _source.TC_TILES[maxd][kernel]


def _tc_launch(kernel, ctype, maxd, tiles, n_rows, B, H, args):
    """Launch one tensor-core kernel over the n_rows rows (queries or keys) of each of the B x H (batch, head)s.

    Shared memory, per _flash_source.py's layout: the block's own rows, once (forward: Q; dQ: Q and dO;
    dK/dV: K and V), and two stages of the tiles it walks (K and V, or Q and dO with their L2 and Di)."""
    mt, tile = _tc_tiles(kernel, maxd, tiles)
    rows = 16 * mt * _TC_WARPS
    if kernel == "flash_fwd_tc":
        smem = _tc_tile_bytes(rows + 4 * tile, maxd) + 2 * tile
    elif kernel == "flash_bwd_dq_tc":
        smem = _tc_tile_bytes(2 * rows + 4 * tile, maxd) + 2 * tile
    else:
        smem = 4 * tile * 4 + _tc_tile_bytes(2 * rows + 4 * tile, maxd)
    rt.launch_shared(_source.tc_name(kernel, ctype, maxd, (mt, tile)), (-(-n_rows // rows), H, B),
                     (32 * _TC_WARPS,), args, smem)


def _tail(key_padding_mask, causal, H, Tq, Tk, D, Dv, scale, cdt):
    mask, has_mask = _mask_arg(key_padding_mask)
    return (mask, scalar(has_mask, np.int32), scalar(bool(causal), np.int32), scalar(H, np.int32),
            scalar(Tq, np.int32), scalar(Tk, np.int32), scalar(D, np.int32), scalar(Dv, np.int32),
            scalar(ref._scale(scale, D, cdt.type), cdt))


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, block_size=None, tiles=None):
    """-> (out in q's dtype, lse (B, H, Tq) in the compute dtype). tiles: {kernel: (m-tiles per warp, tile
    length)} overriding _source.TC_TILES (benchmarks/gpu.py compares the compiled _source.TC_VARIANTS)."""
    B, H, Tq, Tk, D = ref._check_inputs(q, k, v, key_padding_mask, *_blocks(block_size))
    Dv = v.shape[3]
    if block_size is None or not _use_kernel(D, Dv):
        Q, K, V = _up_all(q, k, v)
        fn = ref.attention if block_size is None else ref.attention_tiled
        kw = {} if block_size is None else dict(block_q=block_size, block_k=block_size)
        out, lse = fn(Q, K, V, causal=causal, key_padding_mask=key_padding_mask, scale=scale, **kw)
        return rt.cast(out, q.dtype) if out.dtype != q.dtype else out, lse
    Q, K, V = _inputs(q, k, v)
    cdt = rt.compute_dtype(Q.dtype)
    lse = rt.empty((B, H, Tq), cdt)
    tail = _tail(key_padding_mask, causal, H, Tq, Tk, D, Dv, scale, cdt)
    maxd = _tc_head_dim(Q.dtype, D, Dv)
    if maxd is not None:  # (one dtype, so out is already q's)
        out = _bthd_empty(B, H, Tq, Dv, Q.dtype)
        _tc_launch("flash_fwd_tc", rt.ctype(Q.dtype), maxd, tiles, Tq, B, H,
                   _tc_arg(Q) + _tc_arg(K) + _tc_arg(V) + _tc_arg(out) + (lse, _tc_vec(D, Dv, Q, K, V)) + tail)
        return out, lse
    out = rt.empty((B, H, Tq, Dv), Q.dtype)
    smem = (_BK * (D + 1) + _BK * (Dv + 1) + _BQ * D + _BQ * _BK) * cdt.itemsize
    rt.launch_shared(f"flash_fwd<{rt.ctype(Q.dtype)}>", (-(-Tq // _BQ), B * H), (128,),
                     (raw(Q), raw(K), raw(V), raw(out), lse) + tail, smem)
    return (out if out.dtype == q.dtype else rt.cast(out, q.dtype)), lse


def attention_backward(dout, q, k, v, out, lse, *, causal=False, key_padding_mask=None, scale=None,
                       block_size=None, tiles=None):
    """-> (dq, dk, dv) in q's, k's and v's dtypes. tiles: as attention's."""
    B, H, Tq, Tk, D = ref._check_inputs(q, k, v, key_padding_mask, *_blocks(block_size))
    ref._check_backward_inputs(dout, out, lse, q, v)
    Dv = v.shape[3]
    if block_size is None or not _use_kernel(D, Dv):
        Q, K, V, dO, O, L = _up_all(q, k, v, dout, out, lse)
        if block_size is None:
            grads = ref.attention_backward(dO, Q, K, V, O, L, causal=causal, key_padding_mask=key_padding_mask,
                                           scale=scale)
        else:
            grads = ref.attention_tiled_backward(dO, Q, K, V, O, L, causal=causal,
                                                 key_padding_mask=key_padding_mask, scale=scale,
                                                 block_q=block_size, block_k=block_size)
        return tuple(g if g.dtype == x.dtype else rt.cast(g, x.dtype) for g, x in zip(grads, (q, k, v)))
    cp = cupy()
    Q, K, V, dO = _inputs(q, k, v, dout)
    cdt = rt.compute_dtype(Q.dtype)
    tail = _tail(key_padding_mask, causal, H, Tq, Tk, D, Dv, scale, cdt)
    t = rt.ctype(Q.dtype)
    maxd = _tc_head_dim(Q.dtype, D, Dv)
    if maxd is not None:  # (one dtype, so the gradients are already q's, k's, v's)
        # Di = rowsum(dO * O) and the lse in log2 units (0 for rows with no key), fp32; in one pass when out
        # is stored like dO (in any strides with a unit head-dim stride)
        Lf = rt.contiguous(lse) if lse.dtype == np.float32 else rt.cast(lse, np.float32)
        rows = B * H * Tq
        if out.dtype == Q.dtype and rows:
            O = out if out.shape[-1] <= 1 or out.strides[-1] == out.itemsize else rt.contiguous(out)
            Di, L2 = (rt.empty((B, H, Tq), np.float32) for _ in range(2))
            rt.launch_shared(f"flash_bwd_pre_tc<{t}>", (-(-rows // 8),), (256,),
                             _tc_arg(dO) + _tc_arg(O) + (Lf, Di, L2, scalar(rows, np.int64), scalar(H, np.int32),
                                                         scalar(Tq, np.int32), scalar(Dv, np.int32)), 0)
        else:
            Di = rt.contiguous((rt.up(dO).astype(np.float32) * rt.up(out).astype(np.float32)).sum(axis=-1))
            L2 = rt.contiguous(cp.where(cp.isfinite(Lf), Lf * np.float32(np.log2(np.e)), 0).astype(np.float32))
        dq = _bthd_empty(B, H, Tq, D, Q.dtype)
        dk, dv = _bthd_empty(B, H, Tk, D, Q.dtype), _bthd_empty(B, H, Tk, Dv, Q.dtype)
        args = _tc_arg(Q) + _tc_arg(K) + _tc_arg(V) + _tc_arg(dO) + (L2, Di)
        vec = _tc_vec(D, Dv, Q, K, V, dO)
        _tc_launch("flash_bwd_dkdv_tc", t, maxd, tiles, Tk, B, H, args + _tc_arg(dk) + _tc_arg(dv) + (vec,) + tail)
        _tc_launch("flash_bwd_dq_tc", t, maxd, tiles, Tq, B, H, args + _tc_arg(dq) + (vec,) + tail)
        return dq, dk, dv
    dq, dk, dv = (rt.empty(x.shape, Q.dtype) for x in (Q, K, V))
    dOc, Oc = (rt.up(a).astype(cdt, copy=False) for a in (dout, out))
    Di = rt.contiguous((dOc * Oc).sum(axis=-1))                            # (B, H, Tq) = rowsum(P * dP)
    Lc = rt.up(lse).astype(cdt, copy=False)
    L = rt.contiguous(cp.where(cp.isfinite(Lc), Lc, 0).astype(cdt))        # rows with no key: shift by 0
    smem_kv = (2 * 32 * (D + 1) + 2 * 32 * (Dv + 1) + 2 * 32 + 2 * 4 * 32) * cdt.itemsize
    rt.launch_shared(f"flash_bwd_dkdv<{t}>", (-(-Tk // 32), B * H), (128,),
                     (raw(Q), raw(K), raw(V), raw(dO), L, Di, raw(dk), raw(dv)) + tail, smem_kv)
    smem_q = (_BK * (D + 1) + _BK * (Dv + 1) + _BQ * D + _BQ * Dv + _BQ * _BK) * cdt.itemsize
    rt.launch_shared(f"flash_bwd_dq<{t}>", (-(-Tq // _BQ), B * H), (128,),
                     (raw(Q), raw(K), raw(V), raw(dO), L, Di, raw(dq)) + tail, smem_q)
    return tuple(g if g.dtype == x.dtype else rt.cast(g, x.dtype) for g, x in zip((dq, dk, dv), (q, k, v)))
