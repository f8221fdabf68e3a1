"""The host AdamW in lanes, for an update that runs beside the GPU's forward (ZeRO-Offload §4.2, ZeRO-Infinity §6.2).

refimpl/memory/overlapped_update.py runs step n's host update while step n+1's forward goes on, and the forward
waits, piece by piece, only for the pieces of the partition it needs. A worker thread that calls the parallel
adam_step once per piece needs the GIL between two pieces, and the forward's Python holds it most of the time:
each piece then waits its turn. Here there is no Python between pieces. Each of several threads (the lanes) makes
one nogil call that goes through the pieces in order, and within a piece claims blocks of BLOCK elements with an
atomic counter until none is left, counting each block it finishes in another:

    work[0, k]   blocks of piece k       (set when the update is prepared)
    work[1, k]   blocks claimed so far   (a lane's atomic add returns the block it gets)
    work[2, k]   blocks finished         (piece k is final when it reaches work[0, k]: `pieces_done`)

The split is dynamic: a lane that shares its core with the main thread, or starts late because it waited for the
GIL, takes fewer blocks, and no piece waits for it. The arithmetic is optim.py's `_adam_update`, element for
element (fastmath off), so the bits are adam_step's, however the blocks fall.
"""
import numba
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from refimpl.kernels import optim as ref

from ._bits import BF16, F16, NATIVE, bits_and_kind, f32_to_bf16, f32_to_f16, widen
from .optim import _adam_update, _flat_inplace, adam_scalars

BLOCK = 1 << 16   # elements a lane claims at a time (1.8 MB of traffic); a multiple of 64: whole cache lines
_NO_COPY = -1   # out_kind when there is no low-precision copy to write (else NATIVE: a float32 copy, F16, BF16)


@intrinsic
def _atomic_add(typingctx, counts, k, n):
    """counts[k] += n as one atomic (sequentially consistent) step; returns the value before. counts: int64."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")
    return types.int64(counts, types.int64, types.int64), codegen


@intrinsic
def _atomic_load(typingctx, counts, k):
    """counts[k], read atomically (acquire: what was written before the count is visible after it)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(counts, types.int64), codegen


# adam_step's loop, serial, one function per copy-out: with one loop a function is as fast per thread as the parallel
# kernel; three loops behind a branch in one function were 15-20% slower per thread under load (measured, 2 cores).
# The arrays are the block's own views, so indices run from 0. error_model="numpy" (the parallel kernel's) drops the
# per-element division-by-zero check, without which the loop is not vectorised (3x slower).
_SERIAL = dict(cache=True, fastmath=False, nogil=True, error_model="numpy")


@njit(**_SERIAL)
def _sweep_bf16(p, g, g_kind, m, v, out, grad_scale, decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2,
                step_size, bias_correction2_sqrt, eps):
    for i in range(p.size):
        gi = widen(g[i], g_kind) / grad_scale
        pi, m[i], v[i] = _adam_update(p[i], gi, m[i], v[i], decay, l2, beta1, one_minus_beta1, beta2,
                                      one_minus_beta2, step_size, bias_correction2_sqrt, eps)
        p[i] = pi
        out[i] = f32_to_bf16(pi)


@njit(**_SERIAL)
def _sweep_f16(p, g, g_kind, m, v, out, grad_scale, decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2,
               step_size, bias_correction2_sqrt, eps):
    for i in range(p.size):
        gi = widen(g[i], g_kind) / grad_scale
        pi, m[i], v[i] = _adam_update(p[i], gi, m[i], v[i], decay, l2, beta1, one_minus_beta1, beta2,
                                      one_minus_beta2, step_size, bias_correction2_sqrt, eps)
        p[i] = pi
        out[i] = f32_to_f16(pi)


@njit(**_SERIAL)
def _sweep_f32(p, g, g_kind, m, v, out, grad_scale, decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2,
               step_size, bias_correction2_sqrt, eps):
    for i in range(p.size):
        gi = widen(g[i], g_kind) / grad_scale
        pi, m[i], v[i] = _adam_update(p[i], gi, m[i], v[i], decay, l2, beta1, one_minus_beta1, beta2,
                                      one_minus_beta2, step_size, bias_correction2_sqrt, eps)
        p[i] = pi
        out[i] = pi


@njit(**_SERIAL)
def _sweep(p, g, g_kind, m, v, grad_scale, decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size,
           bias_correction2_sqrt, eps):
    for i in range(p.size):
        gi = widen(g[i], g_kind) / grad_scale
        p[i], m[i], v[i] = _adam_update(p[i], gi, m[i], v[i], decay, l2, beta1, one_minus_beta1, beta2,
                                        one_minus_beta2, step_size, bias_correction2_sqrt, eps)


@njit(**_SERIAL)
def _adam_lane_kernel(bounds, first, block, work, p, g, g_kind, m, v, out, out_kind, *scalars):
    blocks, claimed, finished = work[0], work[1], work[2]
    for k in range(bounds.size - 1):
        j = first + k
        while True:
            c = _atomic_add(claimed, j, 1)
            if c >= blocks[j]:
                break                                   # every block of piece k is taken: on to the next piece
            lo = min(bounds[k + 1], bounds[k] + c * block)
            hi = min(bounds[k + 1], lo + block)
            if out_kind == BF16:
                _sweep_bf16(p[lo:hi], g[lo:hi], g_kind, m[lo:hi], v[lo:hi], out[lo:hi], *scalars)
            elif out_kind == F16:
                _sweep_f16(p[lo:hi], g[lo:hi], g_kind, m[lo:hi], v[lo:hi], out[lo:hi], *scalars)
            elif out_kind == NATIVE:
                _sweep_f32(p[lo:hi], g[lo:hi], g_kind, m[lo:hi], v[lo:hi], out[lo:hi], *scalars)
            else:
                _sweep(p[lo:hi], g[lo:hi], g_kind, m[lo:hi], v[lo:hi], *scalars)
            _atomic_add(finished, j, 1)                 # (seq_cst: the block's stores are visible first)


@njit(cache=True, nogil=True)
def _pieces_done_kernel(work):
    k = 0
    while k < work.shape[1] and work[0, k] > 0 and _atomic_load(work[2], k) >= work[0, k]:
        k += 1
    return k


def new_work(pieces: int) -> np.ndarray:
    """The shared counters of an update in `pieces` pieces (see the module docstring), all zero."""
    return np.zeros((3, pieces), np.int64)


def pieces_done(work) -> int:
    """How many pieces, in order, are final: every block finished, its new values visible to the caller."""
    return int(_pieces_done_kernel(work))


def lane_count() -> int:
    """How many lanes by default: numba's thread count (NUMBA_NUM_THREADS, or set_num_threads)."""
    return numba.get_num_threads()


def adam_lanes(param, grad, exp_avg, exp_avg_sq, *, bounds, first, work, lr, beta1, beta2, eps, weight_decay, step,
               grad_scale=1.0, adamw_mode=True, bias_correction=True, out_lowp=None, block=BLOCK):
    """Prepare one AdamW step of flat float32 states (a sub-group), cut into pieces [bounds[k], bounds[k+1]) that are
    pieces first, first+1, ... of ``work`` (new_work): returns ``run()``, one lane, to be called on as many threads
    as wanted; together they update every piece in order, in blocks of ``block`` elements. None when the arrays need
    adam_step's general path (not C-contiguous float32 states, or a strided copy-out). The rest: adam_step's;
    ``out_lowp`` may be float32 too."""
    ref.check_adam_args(param, grad, exp_avg, exp_avg_sq, step=step, grad_scale=grad_scale, out_lowp=out_lowp)
    states = [_flat_inplace(a) for a in (param, exp_avg, exp_avg_sq)]
    if (any(s is None for s in states) or param.dtype != np.float32
            or np.dtype(grad.dtype).name not in ("float32", "float16", "bfloat16")):
        return None
    out, out_kind = np.empty(0, np.float32), _NO_COPY
    if out_lowp is not None:
        flat_out = _flat_inplace(out_lowp) if out_lowp.dtype.name in ("float32", "float16", "bfloat16") else None
        if flat_out is None or flat_out.size != param.size:
            return None
        out, out_kind = bits_and_kind(flat_out)
    g, g_kind = bits_and_kind(np.ascontiguousarray(grad).reshape(-1))
    bounds = np.asarray(bounds, dtype=np.int64)
    if bounds[0] != 0 or bounds[-1] != param.size or np.any(np.diff(bounds) < 0):
        raise ValueError(f"piece bounds must rise from 0 to the {param.size} elements, got {bounds.tolist()}")
    if not (block > 0 and block % 64 == 0):
        raise ValueError(f"block must be a positive multiple of 64 elements (whole cache lines), got {block}")
    if not 0 <= first <= work.shape[1] - (bounds.size - 1):
        raise ValueError(f"pieces {first}..{first + bounds.size - 2} are not all in work's {work.shape[1]}")
    work[0, first:first + bounds.size - 1] = np.maximum(1, -(-np.diff(bounds) // block))   # (an empty piece: 1)
    scalars = adam_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                           grad_scale=grad_scale, adamw_mode=adamw_mode, bias_correction=bias_correction)

    def run() -> None:
        _adam_lane_kernel(bounds, first, block, work, states[0], g, g_kind, states[1], states[2], out, out_kind,
                          *scalars)
    return run
