"""numba optimizer kernels: fused single-pass AdamW, sum of squares, inf/nan check, cast.

Each mirrors a reference kernel of refimpl/kernels/optim.py (same signature, dtypes in and out, errors).
The Adam step reads grad, param and both moments once and writes param, both moments and the optional
low-precision copy once: 28 bytes per fp32 parameter (plus 2 for a low-precision grad or copy), the
memory-bandwidth floor ZeRO-Infinity's CPU optimizer is judged against. Its float32 arithmetic is the
reference's (torch's) operation by operation, with fastmath off (no FMA contraction, no reassociation),
so fp32 results agree with the reference bit for bit.
"""
import numpy as np
from numba import njit, prange

from refimpl.kernels import optim as ref

from ._bits import BF16, F16, NATIVE, bits_and_kind, bf16_to_f32, f32_to_bf16, f32_to_f16, widen

_BLOCK = 1 << 14  # elements per parallel work item of the reductions


# ---------------------------------------------------------------------------------------------- adam
# One kernel per variant, so that the hot loop has no branches and LLVM vectorises it (a branch on the
# copy-out kind or the decay mode inside the prange loop made the step ~3x slower). The decay mode is
# chosen at compile time: `l2` is None for AdamW (numba prunes the `is None` branch per signature).
@njit(inline="always")
def _adam_update(pi, gi, mi, vi, decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size,
                 bias_correction2_sqrt, eps):
    """torch's _single_tensor_adam for one float32 element -> (param, exp_avg, exp_avg_sq)."""
    pi = pi * decay                                      # AdamW: decoupled decay (decay = 1 otherwise)
    if l2 is not None:
        gi = gi + l2 * pi                                # Adam-L2: decay through the moments
    mi = mi * beta1 + one_minus_beta1 * gi
    vi = vi * beta2 + one_minus_beta2 * gi * gi          # ((1-b2)*g)*g, torch's addcmul order
    denom = np.sqrt(vi) / bias_correction2_sqrt + eps
    return pi - step_size * mi / denom, mi, vi           # (step_size*m)/denom, torch's addcdiv order


@njit(parallel=True, cache=True, fastmath=False, nogil=True)   # the host update may run beside the GPU's work
def _adam_kernel(p, g, g_kind, m, v, grad_scale, decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2,
                 step_size, bias_correction2_sqrt, eps):
    """One pass of torch's _single_tensor_adam over flat float32 arrays; the scalars are float32."""
    for i in prange(p.size):
        gi = widen(g[i], g_kind) / grad_scale           # unscale (loss scale and clip factor in one)
        p[i], m[i], v[i] = _adam_update(p[i], gi, m[i], v[i], decay, l2, beta1, one_minus_beta1, beta2,
                                        one_minus_beta2, step_size, bias_correction2_sqrt, eps)


@njit(parallel=True, cache=True, fastmath=False, nogil=True)   # the host update may run beside the GPU's work
def _adam_f16_kernel(p, g, g_kind, m, v, out, grad_scale, decay, l2, beta1, one_minus_beta1, beta2,
                     one_minus_beta2, step_size, bias_correction2_sqrt, eps):
    """_adam_kernel plus the float16 copy of the new param (uint16 bits) in the same pass."""
    for i in prange(p.size):
        gi = widen(g[i], g_kind) / grad_scale
        pi, m[i], v[i] = _adam_update(p[i], gi, m[i], v[i], decay, l2, beta1, one_minus_beta1, beta2,
                                      one_minus_beta2, step_size, bias_correction2_sqrt, eps)
        p[i] = pi
        out[i] = f32_to_f16(pi)


@njit(parallel=True, cache=True, fastmath=False, nogil=True)   # the host update may run beside the GPU's work
def _adam_bf16_kernel(p, g, g_kind, m, v, out, grad_scale, decay, l2, beta1, one_minus_beta1, beta2,
                      one_minus_beta2, step_size, bias_correction2_sqrt, eps):
    """_adam_kernel plus the bfloat16 copy of the new param (uint16 bits) in the same pass."""
    for i in prange(p.size):
        gi = widen(g[i], g_kind) / grad_scale
        pi, m[i], v[i] = _adam_update(p[i], gi, m[i], v[i], decay, l2, beta1, one_minus_beta1, beta2,
                                      one_minus_beta2, step_size, bias_correction2_sqrt, eps)
        p[i] = pi
        out[i] = f32_to_bf16(pi)


def _flat_inplace(a):
    """A flat view that writes through to `a`, or None when `a` cannot give one (not C-contiguous)."""
    a = np.asarray(a)
    return a.reshape(-1) if a.flags.c_contiguous else None


def adam_scalars(*, lr, beta1, beta2, eps, weight_decay, step, grad_scale, adamw_mode, bias_correction):
    """The kernels' scalar arguments after the arrays, as torch computes them: Python float64, entering the fp32
    arithmetic once each."""
    lr, beta1, beta2, eps, weight_decay, step = (float(lr), float(beta1), float(beta2), float(eps),
                                                 float(weight_decay), int(step))
    f32 = np.float32
    decay = 1.0 - lr * weight_decay if (weight_decay != 0 and adamw_mode) else 1.0
    l2 = None if adamw_mode else f32(weight_decay)
    bias_correction1 = 1.0 - beta1 ** step if bias_correction else 1.0
    bias_correction2 = 1.0 - beta2 ** step if bias_correction else 1.0
    return (f32(grad_scale), f32(decay), l2, f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2),
            f32(lr / bias_correction1), f32(bias_correction2 ** 0.5), f32(eps))


def adam_step(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
              grad_scale=1.0, adamw_mode=True, bias_correction=True, out_lowp=None):
    """Mirrors refimpl.kernels.optim.adam_step: one fused AdamW step in place, optional fp16/bf16 copy
    (float64 states, the fp64 reference run, take the reference)."""
    ref.check_adam_args(param, grad, exp_avg, exp_avg_sq, step=step, grad_scale=grad_scale, out_lowp=out_lowp)

    states = [_flat_inplace(a) for a in (param, exp_avg, exp_avg_sq)]
    if (any(s is None for s in states) or param.dtype != np.float32
            or np.dtype(grad.dtype).name not in ("float32", "float16", "bfloat16")):
        return ref.adam_step(param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                             weight_decay=weight_decay, step=step, grad_scale=grad_scale,
                             adamw_mode=adamw_mode, bias_correction=bias_correction, out_lowp=out_lowp)
    out, out_kind = None, NATIVE                        # NATIVE: no fused copy
    if out_lowp is not None and out_lowp.dtype.name in ("float16", "bfloat16"):
        flat_out = _flat_inplace(out_lowp)
        if flat_out is not None:
            out, out_kind = bits_and_kind(flat_out)
    g, g_kind = bits_and_kind(np.ascontiguousarray(grad).reshape(-1))

    scalars = adam_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                           grad_scale=grad_scale, adamw_mode=adamw_mode, bias_correction=bias_correction)
    if out_kind == F16:
        _adam_f16_kernel(states[0], g, g_kind, states[1], states[2], out, *scalars)
    elif out_kind == BF16:
        _adam_bf16_kernel(states[0], g, g_kind, states[1], states[2], out, *scalars)
    else:
        _adam_kernel(states[0], g, g_kind, states[1], states[2], *scalars)
    if out_lowp is not None and out_kind == NATIVE:      # float32 copy, or a strided one: not fused
        out_lowp[...] = ref.cast(param, out_lowp.dtype)


# ----------------------------------------------------------------------------------------- reductions
@njit(parallel=True, cache=True)
def _sum_squares_kernel(x, kind):
    n_blocks = (x.size + _BLOCK - 1) // _BLOCK
    partial = np.zeros(n_blocks)
    for blk in prange(n_blocks):
        s = 0.0
        for i in range(blk * _BLOCK, min(x.size, (blk + 1) * _BLOCK)):
            xi = np.float64(widen(x[i], kind))
            s += xi * xi
        partial[blk] = s
    return partial.sum()


def sum_squares(x) -> float:
    """Mirrors refimpl.kernels.optim.sum_squares: sum of squares in float64 (fp16/bf16 decoded in the
    kernel, no upcast copy), non-finite values propagate; a Python float."""
    flat, kind = bits_and_kind(np.ascontiguousarray(x).reshape(-1))
    return float(_sum_squares_kernel(flat, kind))


@njit(parallel=True, cache=True)
def _count_non_finite(x, kind):
    n_blocks = (x.size + _BLOCK - 1) // _BLOCK
    count = 0
    for blk in prange(n_blocks):
        for i in range(blk * _BLOCK, min(x.size, (blk + 1) * _BLOCK)):
            if not np.isfinite(widen(x[i], kind)):
                count += 1
    return count


def has_inf_or_nan(x) -> bool:
    """Mirrors refimpl.kernels.optim.has_inf_or_nan: any +-inf or nan, checked per element (no sum)."""
    flat, kind = bits_and_kind(np.ascontiguousarray(x).reshape(-1))
    return bool(_count_non_finite(flat, kind) > 0)


# ----------------------------------------------------------------------------------------------- cast
@njit(parallel=True, cache=True)
def _f32_to_bf16_kernel(x, out):
    for i in prange(x.size):
        out[i] = f32_to_bf16(x[i])


@njit(parallel=True, cache=True)
def _bf16_to_f32_kernel(h, out):
    for i in prange(h.size):
        out[i] = bf16_to_f32(h[i])


def cast(x, dtype):
    """Mirrors refimpl.kernels.optim.cast: a new array, round to nearest even. float32 <-> bfloat16 runs
    in numba on uint16 views; every other pair (float16 included) is NumPy's own cast, as the reference."""
    src, dst = np.dtype(x.dtype).name, np.dtype(dtype).name
    if (src, dst) == ("float32", "bfloat16"):
        out = np.empty(x.shape, np.uint16)
        _f32_to_bf16_kernel(np.ascontiguousarray(x).reshape(-1), out.reshape(-1))
        return out.view(dtype)
    if (src, dst) == ("bfloat16", "float32"):
        out = np.empty(x.shape, np.float32)
        _bf16_to_f32_kernel(np.ascontiguousarray(x).view(np.uint16).reshape(-1), out.reshape(-1))
        return out
    return ref.cast(x, dtype)
