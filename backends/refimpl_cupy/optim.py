"""Optimizer kernels on the GPU: same signatures and semantics as refimpl/kernels/optim.py.

adam_step is one pass over memory (read param, grad, m, v; write param, m, v and the optional
low-precision copy), with the reference's arithmetic operation for operation (_source.py: adam_k).
sum_squares accumulates in float64 with a fixed-order tree (deterministic); has_inf_or_nan is a flag
kernel; cast is the RNE conversion kernel.
"""
import numpy as np

from refimpl.kernels import optim as ref

from . import _runtime as rt
from ._runtime import cupy, raw, scalar


def adam_step(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
              grad_scale=1.0, adamw_mode=True, bias_correction=True, out_lowp=None):
    """One fused AdamW step, in place on float32 param/exp_avg/exp_avg_sq (see the reference for the
    update); grad float32/float16/bfloat16/float64 is divided by grad_scale; out_lowp receives param
    rounded to its dtype. Returns None. float64 states (the fp64 reference run) take the reference."""
    ref.check_adam_args(param, grad, exp_avg, exp_avg_sq, step=step, grad_scale=grad_scale, out_lowp=out_lowp)
    if param.dtype != np.float32:
        return ref.adam_step(param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                             weight_decay=weight_decay, step=step, grad_scale=grad_scale, adamw_mode=adamw_mode,
                             bias_correction=bias_correction, out_lowp=out_lowp)
    lr, beta1, beta2, eps, weight_decay = map(float, (lr, beta1, beta2, eps, weight_decay))
    step = int(step)
    bias_correction1 = 1.0 - beta1 ** step if bias_correction else 1.0
    bias_correction2 = 1.0 - beta2 ** step if bias_correction else 1.0

    # The kernel updates flat contiguous arrays; a strided state array is updated through a contiguous
    # copy that is written back, so the caller's arrays still hold the result.
    state = [param, exp_avg, exp_avg_sq] + ([out_lowp] if out_lowp is not None else [])
    work = [rt.contiguous(a) for a in state]
    g = rt.contiguous(grad)
    out = work[3] if out_lowp is not None else None
    f32 = np.float32
    args = (work[0], raw(g), work[1], work[2],
            raw(out) if out is not None else work[0],  # not written when the output type is none_t
            scalar(param.size, np.int64), scalar(grad_scale, f32), scalar(grad_scale != 1.0, np.int32),
            scalar(weight_decay != 0, np.int32), scalar(bool(adamw_mode), np.int32),
            scalar(1.0 - lr * weight_decay, f32), scalar(weight_decay, f32),
            scalar(beta1, f32), scalar(1.0 - beta1, f32), scalar(beta2, f32), scalar(1.0 - beta2, f32),
            scalar(bias_correction2 ** 0.5, f32), scalar(eps, f32), scalar(lr / bias_correction1, f32))
    out_t = "none_t" if out is None else rt.ctype(out.dtype)
    rt.launch_elementwise(f"adam_k<{rt.ctype(g.dtype)}, {out_t}>", param.size, *args)
    for dst, src in zip(state, work):
        if dst is not src:
            raw(dst)[...] = raw(src)


def sum_squares(x) -> float:
    """Sum of squares in float64 (fp16/bf16/fp32 upcast), as a Python float; inf/nan propagate."""
    cp = cupy()
    xr = rt.contiguous(x)
    if xr.dtype.name not in ("float64", "float32", "float16", "bfloat16"):
        xr = xr.astype(cp.float64)
    n = xr.size
    if n == 0:
        return 0.0
    blocks = min(1024, -(-n // rt.THREADS))
    partial = cp.empty(blocks, cp.float64)
    rt.kernel(f"sumsq_k<{rt.ctype(xr.dtype)}>")((blocks,), (rt.THREADS,), (raw(xr), partial, scalar(n, np.int64)))
    return float(partial.sum())


def has_inf_or_nan(x) -> bool:
    """True if any element is +-inf or nan (per-element isfinite, never a sum that could overflow)."""
    cp = cupy()
    if x.dtype.name not in ("float64", "float32", "float16", "bfloat16"):
        return False  # integers and bools are always finite
    xr = rt.contiguous(x)
    flag = cp.zeros(1, cp.int32)
    rt.launch_elementwise(f"nonfinite_k<{rt.ctype(xr.dtype)}>", xr.size, raw(xr), flag, scalar(xr.size, np.int64))
    return bool(flag.get()[0])


def cast(x, dtype):
    """A new array holding x converted to dtype (round-to-nearest-even; beyond the range: +-inf)."""
    return rt.cast(x, dtype)
