"""The host AdamW in lanes, for an update that runs beside the GPU's forward (ZeRO-Offload §4.2, ZeRO-Infinity §6.2).

refimpl/memory/overlapped_update.py runs step n's host update while step n+1's forward goes on, and the forward
waits, piece by piece, only for the pieces of the partition it needs. A worker thread that calls the parallel
adam_step once per piece needs the GIL between two pieces, and the forward's Python holds it most of the time:
each piece then waits its turn. Here there is no Python between pieces. Each of `lanes` threads makes one nogil
call that sweeps its own share of every piece, in piece order, and after each piece stores how many it has done
in its slot of a shared `progress` array. Piece k is final once every lane's count passes k: `lanes_done`.

    lane 0:  piece 0 [share 0] | piece 1 [share 0] | ...   progress[0] = 1, 2, ...
    lane 1:  piece 0 [share 1] | piece 1 [share 1] | ...   progress[1] = 1, 2, ...

The arithmetic is optim.py's `_adam_update`, element for element (fastmath off), so the bits are adam_step's.
The lanes are a static split with no barrier: a lane that shares its core with the main thread finishes late, and
only the pieces it holds wait for it.
"""
import numba
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from refimpl.kernels import optim as ref

from ._bits import BF16, F16, NATIVE, bits_and_kind, f32_to_bf16, f32_to_f16, widen
from .optim import _adam_update, _flat_inplace, adam_scalars

_LINE = 64      # elements: lane shares start on whole cache lines of every array (float32 and uint16 alike)
_NO_COPY = -1   # out_kind when there is no low-precision copy to write (else NATIVE: a float32 copy, F16, BF16)


@intrinsic
def _fence(typingctx):
    """A full memory fence: a lane's stores to the states are visible before its progress count is, and the
    reader sees them after it reads the count (needed on weakly ordered CPUs such as ARM; free on x86)."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


# adam_step's loop, serial, one function per copy-out: a function with one loop is as fast per thread as the parallel
# kernel's, three loops behind a branch in one function were 15-20% slower under load (LLVM then compiles each loop
# for either gradient kind). Arrays start at the lane's share, so indices run from 0 and LLVM knows they are never
# negative; error_model="numpy" (the parallel kernel's) drops the division-by-zero check: both keep the loop vectorised.
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
def _adam_lane_kernel(lane, lanes, bounds, first, progress, p, g, g_kind, m, v, out, out_kind, *scalars):
    for k in range(bounds.size - 1):
        a, b = bounds[k], bounds[k + 1]
        share = ((b - a + lanes - 1) // lanes + _LINE - 1) // _LINE * _LINE
        lo = min(b, a + lane * share)
        hi = min(b, lo + share)
        if out_kind == BF16:
            _sweep_bf16(p[lo:hi], g[lo:hi], g_kind, m[lo:hi], v[lo:hi], out[lo:hi], *scalars)
        elif out_kind == F16:
            _sweep_f16(p[lo:hi], g[lo:hi], g_kind, m[lo:hi], v[lo:hi], out[lo:hi], *scalars)
        elif out_kind == NATIVE:
            _sweep_f32(p[lo:hi], g[lo:hi], g_kind, m[lo:hi], v[lo:hi], out[lo:hi], *scalars)
        else:
            _sweep(p[lo:hi], g[lo:hi], g_kind, m[lo:hi], v[lo:hi], *scalars)
        _fence()
        progress[lane] = first + k + 1


@njit(cache=True, nogil=True)
def _lanes_done_kernel(progress):
    done = progress.min()
    _fence()
    return done


def lane_count() -> int:
    """How many lanes by default: numba's thread count (NUMBA_NUM_THREADS, or set_num_threads)."""
    return numba.get_num_threads()


def lanes_done(progress) -> int:
    """How many pieces every lane has finished (their new values visible to the caller)."""
    return int(_lanes_done_kernel(progress))


def adam_lanes(param, grad, exp_avg, exp_avg_sq, *, bounds, first, progress, lr, beta1, beta2, eps, weight_decay,
               step, grad_scale=1.0, adamw_mode=True, bias_correction=True, out_lowp=None):
    """Prepare one AdamW step of flat float32 states (a sub-group), cut into pieces [bounds[k], bounds[k+1]), as
    lanes: returns ``run(lane, lanes)``, which updates that lane's share of every piece in order and after piece k
    sets ``progress[lane] = first + k + 1`` (int64). None when the arrays need adam_step's general path (not
    C-contiguous float32 states, or a strided copy-out). The rest: adam_step's; ``out_lowp`` may be float32 too."""
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
    scalars = adam_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                           grad_scale=grad_scale, adamw_mode=adamw_mode, bias_correction=bias_correction)

    def run(lane: int, lanes: int) -> None:
        _adam_lane_kernel(lane, lanes, bounds, first, progress, states[0], g, g_kind, states[1], states[2], out,
                          out_kind, *scalars)
    return run
