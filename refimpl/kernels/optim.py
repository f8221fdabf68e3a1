"""Reference optimizer kernels: fused AdamW step, sum of squares, overflow check, dtype cast.

These are the NumPy *specification* of the optimizer half of the backend interface
(docs/architecture.md, "The backend interface"): the numba and CuPy backends are tested against them.
They take their array namespace from the input (Chainer's ``get_array_module`` pattern), so
the same code also runs unchanged on CuPy arrays.

The Adam step is the one ZeRO-Infinity runs on each rank's flat fp32 partition of master
weights and moments (Rajbhandari et al., "ZeRO-Infinity", SC'21, §5: "the optimizer states
... are stored in fp32" and updated shard by shard). Its arithmetic follows
``torch.optim.adam._single_tensor_adam`` (torch 2.x) term by term and in the same order, so
fp32 results agree with ``torch.optim.AdamW`` to a few ulps; gradient unscaling by one
divisor follows DeepSpeed's fused Adam (``deepspeed/ops/adam/fused_adam.py``, whose callers
fold loss scale and clipping into ``combined_scale``).
"""
import numpy as np

from . import array_module

# sum_squares upcasts to float64 (and has_inf_or_nan makes a bool mask); doing it in blocks bounds that
# temporary to 8 MiB instead of 1-4x the size of the (possibly huge) gradient shard.
_SUM_SQUARES_BLOCK = 1 << 20


_xp = array_module  # Chainer's get_array_module pattern (refimpl/kernels/__init__.py)


def _check_same_shape(name, arr, shape):
    if arr.shape != shape:
        raise ValueError(f"adam_step: {name} has shape {arr.shape}, expected param's shape {shape}")


def check_adam_args(param, grad, exp_avg, exp_avg_sq, *, step, grad_scale, out_lowp=None) -> None:
    """The argument checks of adam_step, shared by every backend's adam_step (the same errors everywhere)."""
    if param.dtype not in (np.float32, np.float64):
        raise ValueError(f"adam_step: param must be float32 (or float64, the fp64 reference), got {param.dtype}")
    for name, arr in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if arr.dtype != param.dtype:
            raise ValueError(f"adam_step: {name} must be {param.dtype} like param, got {arr.dtype}")
    for name, arr in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out_lowp", out_lowp)):
        if arr is not None:
            _check_same_shape(name, arr, param.shape)
    if int(step) != step or step < 1:
        raise ValueError(f"adam_step: step must be an integer >= 1 (1-based), got {step!r}")
    if not grad_scale > 0:
        raise ValueError(f"adam_step: grad_scale must be > 0, got {grad_scale!r}")


def adam_step(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
              grad_scale=1.0, adamw_mode=True, bias_correction=True, out_lowp=None):
    """One fused AdamW step, in place on flat float32 arrays param/exp_avg/exp_avg_sq (same shape; float64
    throughout for the fp64 reference run).

    grad: float32 (or float16/bfloat16, upcast) gradient; it is divided by ``grad_scale`` first
    (grad_scale folds loss-scale unscaling and the clipping factor into one divisor, as
    DeepSpeed's fused Adam does). ``step``: 1-based step count for bias correction.
    ``adamw_mode=True``: decoupled weight decay (param *= 1 - lr*weight_decay, Loshchilov &
    Hutter); False: classic Adam L2 (grad += weight_decay*param). ``bias_correction=False`` drops
    the 1 - beta^step divisors (DeepSpeed's FusedAdam / DeepSpeedCPUAdam ``bias_correction``).
    Update, as torch.optim.AdamW / DeepSpeed's FusedAdam::

        m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g*g
        denom = sqrt(v)/sqrt(1-b2^step) + eps ; param -= lr/(1-b1^step) * m / denom

    Scalars (bias corrections, step size) are computed in Python float64 and enter the fp32
    array arithmetic once each, as in torch. ``out_lowp``: optional array of param's shape
    (float16/bfloat16/float32) that receives param cast to its dtype after the update (the
    low-precision model copy). Returns None.
    """
    xp = _xp(param)
    check_adam_args(param, grad, exp_avg, exp_avg_sq, step=step, grad_scale=grad_scale, out_lowp=out_lowp)

    # Python floats, so numpy/cupy treat them as weak scalars and compute in float32 (as torch
    # does with Python-number hyperparameters) rather than promoting to float64.
    lr, beta1, beta2, eps, weight_decay = map(float, (lr, beta1, beta2, eps, weight_decay))
    step = int(step)

    # A private copy in param's dtype (fp32): the caller's gradient buffer is never modified.
    g = grad.astype(param.dtype)
    if grad_scale != 1.0:
        g /= float(grad_scale)

    if weight_decay != 0:
        if adamw_mode:
            param *= 1.0 - lr * weight_decay          # decoupled: shrink weights directly
        else:
            g += weight_decay * param                 # L2: decay goes through the moments

    exp_avg *= beta1
    exp_avg += (1.0 - beta1) * g
    exp_avg_sq *= beta2
    exp_avg_sq += (1.0 - beta2) * g * g               # ((1-b2)*g)*g, torch's addcmul order

    bias_correction1 = 1.0 - beta1 ** step if bias_correction else 1.0
    bias_correction2 = 1.0 - beta2 ** step if bias_correction else 1.0
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5

    denom = xp.sqrt(exp_avg_sq)
    denom /= bias_correction2_sqrt
    denom += eps
    param -= step_size * exp_avg / denom              # (step_size*m)/denom, torch's addcdiv order

    if out_lowp is not None:
        out_lowp[...] = cast(param, out_lowp.dtype)


def sum_squares(x) -> float:
    """Sum of squares of all elements, accumulated in float64 (fp16/bf16 upcast), as a Python float.

    Non-finite elements propagate (inf or nan), so a norm built on it reveals an overflow.
    """
    xp = _xp(x)
    flat = x.reshape(-1)                              # (N,)
    total = 0.0
    for start in range(0, flat.size, _SUM_SQUARES_BLOCK):
        block = flat[start:start + _SUM_SQUARES_BLOCK].astype(xp.float64)
        total += float(xp.sum(block * block))
    return total


def has_inf_or_nan(x) -> bool:
    """True if any element of ``x`` is +-inf or nan (DeepSpeed's fp16 overflow test).

    Uses isfinite per element rather than DeepSpeed's "sum and check the sum", which can
    overflow to inf on large but finite fp16 gradients.
    """
    xp = _xp(x)
    flat = x.reshape(-1)
    return not all(bool(xp.isfinite(flat[i:i + _SUM_SQUARES_BLOCK]).all())   # blocks: no Ψ-sized temporary
                   for i in range(0, flat.size, _SUM_SQUARES_BLOCK))


def cast(x, dtype):
    """A new array holding ``x`` converted to ``dtype`` (round-to-nearest-even, as numpy/ml_dtypes).

    Values beyond the target range become +-inf (that is the correctly rounded result; the
    overflow check downstream is what catches it), so numpy's overflow warning is silenced.
    """
    with np.errstate(over="ignore"):
        return x.astype(dtype, copy=True)
