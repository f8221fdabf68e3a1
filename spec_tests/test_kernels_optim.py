"""Equivalence tests of the optimizer kernels (refimpl/kernels/optim.py) on every backend.

- adam_step: against the AdamW update written out here in float64 from torch.optim.AdamW's documented
  algorithm (Loshchilov & Hutter's decoupled decay; classic L2 decay with adamw_mode=False), over several
  consecutive steps, checking the in-place contract (param / exp_avg / exp_avg_sq updated in place,
  grad untouched, None returned) and the low-precision copy `out_lowp`; and (crosscheck) against
  torch.optim.AdamW / Adam themselves.
- sum_squares: against math.fsum of the float64 squares (correctly rounded), on values whose squares
  overflow float16 or float32 (the accumulation must be float64, as the docstring promises).
- has_inf_or_nan: against a per-element math.isfinite, including large finite values whose *sum*
  overflows (DeepSpeed's "sum, then check" trick would flag those).
- cast: bit-exact round-to-nearest-even against independent conversions (a bit-level bfloat16 rounding
  and NumPy's float64 -> float16 path), and the fp32 -> fp16/bf16 -> fp32 round trip.
"""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from .strategies import (FLOAT_DTYPES, LOW_PRECISION, adam_hyperparams, dtype_id, float_dtypes,
                         random_array, seeds, shapes, sizes)
from .tolerances import assert_close, run_kernel

bfloat16 = ml_dtypes.bfloat16


def f64(a):
    return np.asarray(a).astype(np.float64)


# --------------------------------------------------------------------------------------------- adam_step
class Float64AdamW:
    """torch.optim.AdamW's update (adamw_mode) or Adam's with L2 decay, in float64, written from the
    algorithm in torch's documentation. Alongside each state it carries the same recurrence on absolute
    values (p_abs, m_abs): the scale that float32 rounding errors are proportional to."""

    def __init__(self, param, exp_avg, exp_avg_sq):
        self.p, self.m, self.v = f64(param), f64(exp_avg), f64(exp_avg_sq)
        self.p_abs, self.m_abs = np.abs(self.p), np.abs(self.m)

    def step(self, grad, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale, adamw_mode, bias_correction):
        g = f64(grad) / grad_scale
        g_abs = np.abs(g)
        if adamw_mode:
            self.p = self.p * (1 - lr * weight_decay)
            self.p_abs = self.p_abs * (1 - lr * weight_decay)
        else:
            g, g_abs = g + weight_decay * self.p, g_abs + weight_decay * self.p_abs
        self.m = beta1 * self.m + (1 - beta1) * g
        self.m_abs = beta1 * self.m_abs + (1 - beta1) * g_abs
        self.v = beta2 * self.v + (1 - beta2) * g * g  # a sum of non-negative terms: its own scale
        bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if bias_correction else (1.0, 1.0)
        step_size = lr / bc1
        denom = np.sqrt(self.v) / math.sqrt(bc2) + eps
        self.p = self.p - step_size * self.m / denom
        self.p_abs = self.p_abs + step_size * self.m_abs / denom


@pytest.mark.kernel("adam_step")
@pytest.mark.parametrize("grad_dtype", [np.float32, np.float16, bfloat16], ids=dtype_id)
@given(n=sizes(300), hp=adam_hyperparams(), n_steps=st.integers(1, 3), seed=seeds,
       out_dtype=st.sampled_from([None, np.float16, bfloat16, np.float32]))
def test_adam_step(backend, grad_dtype, n, hp, n_steps, seed, out_dtype):
    rng = np.random.default_rng(seed)
    param = random_array(rng, (n,), np.float32)
    exp_avg = random_array(rng, (n,), np.float32, scale=0.1)
    exp_avg_sq = np.abs(random_array(rng, (n,), np.float32, scale=0.01))
    # loss-scaled gradients: O(1) once divided by grad_scale
    grads = [random_array(rng, (n,), grad_dtype, scale=hp["grad_scale"]) for _ in range(n_steps)]

    p, m, v = (backend.asarray(a.copy()) for a in (param, exp_avg, exp_avg_sq))
    out_lowp = None if out_dtype is None else backend.zeros((n,), dtype=out_dtype)
    oracle = Float64AdamW(param, exp_avg, exp_avg_sq)
    for i, grad in enumerate(grads):
        kw = dict(hp, step=hp["step"] + i)
        g = backend.asarray(grad.copy())
        assert backend.adam_step(p, g, m, v, out_lowp=out_lowp, **kw) is None
        oracle.step(grad, **kw)
        assert np.ascontiguousarray(backend.to_numpy(g)).tobytes() == grad.tobytes(), "grad was modified"

    # In place: the arrays passed in hold the new state (a backend returning new arrays fails here).
    assert_close(backend.to_numpy(p), oracle.p, np.float32, scale=oracle.p_abs, what="param")
    assert_close(backend.to_numpy(m), oracle.m, np.float32, scale=oracle.m_abs, what="exp_avg")
    assert_close(backend.to_numpy(v), oracle.v, np.float32, scale=oracle.v, what="exp_avg_sq")
    for name, arr in (("param", p), ("exp_avg", m), ("exp_avg_sq", v)):
        assert np.dtype(backend.to_numpy(arr).dtype) == np.float32, f"{name} is no longer float32"
    if out_lowp is not None:
        # the low-precision copy is exactly the updated fp32 param rounded to nearest even
        low = backend.to_numpy(out_lowp)
        assert np.dtype(low.dtype) == np.dtype(out_dtype)
        np.testing.assert_array_equal(f64(low), f64(backend.to_numpy(p).astype(out_dtype)))


@pytest.mark.kernel("adam_step")
@given(n=sizes(200), hp=adam_hyperparams(), n_steps=st.integers(1, 3), seed=seeds)
def test_adam_step_float64_states(backend, n, hp, n_steps, seed):
    # The fp64 reference run (model.dtype=float64) steps float64 master weights and moments with float64
    # gradients: every backend must then agree with the float64 oracle to float64 rounding.
    rng = np.random.default_rng(seed)
    param, exp_avg = rng.standard_normal(n), 0.1 * rng.standard_normal(n)
    exp_avg_sq = np.abs(0.01 * rng.standard_normal(n))
    p, m, v = (backend.asarray(a.copy()) for a in (param, exp_avg, exp_avg_sq))
    oracle = Float64AdamW(param, exp_avg, exp_avg_sq)
    for i in range(n_steps):
        grad = hp["grad_scale"] * rng.standard_normal(n)
        kw = dict(hp, step=hp["step"] + i)
        backend.adam_step(p, backend.asarray(grad), m, v, **kw)
        oracle.step(grad, **kw)
    for name, arr, ref, scale in (("param", p, oracle.p, oracle.p_abs), ("exp_avg", m, oracle.m, oracle.m_abs),
                                  ("exp_avg_sq", v, oracle.v, oracle.v)):
        got = backend.to_numpy(arr)
        assert got.dtype == np.float64, f"{name} is no longer float64"
        assert_close(got, ref, np.float64, scale=scale, what=name)


@pytest.mark.kernel("adam_step")
def test_adam_step_rejects_bad_input(backend):
    def args(dtype=np.float32, n=4):
        return [backend.asarray(np.zeros(n, dtype=dtype)) for _ in range(4)]
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="step"):
        backend.adam_step(*args(), step=0, **hp)  # step is 1-based
    with pytest.raises(ValueError, match="float32"):
        backend.adam_step(*args(np.float16), step=1, **hp)  # master weights and moments are fp32
    p, g, m, v = args()
    with pytest.raises(ValueError, match="shape"):
        backend.adam_step(p, backend.asarray(np.zeros(5, np.float32)), m, v, step=1, **hp)
    with pytest.raises(ValueError, match="grad_scale"):
        backend.adam_step(p, g, m, v, step=1, grad_scale=0.0, **hp)


@pytest.mark.kernel("adam_step")
@pytest.mark.crosscheck
@pytest.mark.parametrize("adamw_mode", [True, False], ids=["AdamW", "Adam-L2"])
def test_adam_step_matches_torch(backend, adamw_mode):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    n, step, grad_scale = 37, 5, 1024.0
    param = random_array(rng, (n,), np.float32)
    exp_avg = random_array(rng, (n,), np.float32, scale=0.1)
    exp_avg_sq = np.abs(random_array(rng, (n,), np.float32, scale=0.01))
    grad = random_array(rng, (n,), np.float32, scale=grad_scale)
    hp = dict(lr=1e-2, eps=1e-8, weight_decay=0.1)

    tp = torch.nn.Parameter(torch.from_numpy(param.copy()))
    tp.grad = torch.from_numpy(grad.copy()) / grad_scale  # the same fp32 division the kernel does
    opt = (torch.optim.AdamW if adamw_mode else torch.optim.Adam)([tp], betas=(0.9, 0.999), foreach=False, **hp)
    opt.state[tp] = {"step": torch.tensor(float(step - 1)), "exp_avg": torch.from_numpy(exp_avg.copy()),
                     "exp_avg_sq": torch.from_numpy(exp_avg_sq.copy())}
    opt.step()

    p, m, v = (backend.asarray(a.copy()) for a in (param, exp_avg, exp_avg_sq))
    backend.adam_step(p, backend.asarray(grad), m, v, beta1=0.9, beta2=0.999, step=step,
                      grad_scale=grad_scale, adamw_mode=adamw_mode, **hp)
    assert_close(backend.to_numpy(p), tp.detach().numpy(), np.float32, what="param vs torch")
    assert_close(backend.to_numpy(m), opt.state[tp]["exp_avg"].numpy(), np.float32, what="exp_avg vs torch")
    assert_close(backend.to_numpy(v), opt.state[tp]["exp_avg_sq"].numpy(), np.float32,
                 what="exp_avg_sq vs torch")


# ------------------------------------------------------------------------------------------- sum_squares
@pytest.mark.kernel("sum_squares")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(shape=shapes(max_dims=3, max_size=16), seed=seeds, large=st.booleans())
def test_sum_squares(backend, dtype, shape, seed, large):
    # large: squares overflow float16 (and float32 for the wider types) unless accumulated in float64
    scale = min(1e18, float(ml_dtypes.finfo(dtype).max) / 10) if large else 1.0
    x = random_array(seed, shape, dtype, scale=scale)
    total = run_kernel(backend, "sum_squares", x)
    assert isinstance(total, float), f"sum_squares returned {type(total).__name__}, not a Python float"
    expected = math.fsum(float(e) ** 2 for e in f64(x).reshape(-1))
    assert_close(total, expected, np.float64, scale=expected, what="sum_squares")


@pytest.mark.kernel("sum_squares")
def test_sum_squares_long_array_is_exact(backend):
    """A million float16 values k/8 (more than one reference block): squares are multiples of 1/64 and
    the sum stays below 2**53/64, so float64 accumulation must give the exact integer-derived total."""
    k = np.random.default_rng(0).integers(-200, 201, size=(1 << 20) + 3)
    x = (k / 8).astype(np.float16)
    total = run_kernel(backend, "sum_squares", x)
    assert total == float(np.sum(k * k)) / 64


@pytest.mark.kernel("sum_squares")
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_sum_squares_propagates_non_finite(backend, bad):
    x = np.ones(10, dtype=np.float32)
    x[3] = bad
    total = run_kernel(backend, "sum_squares", x)
    assert math.isnan(total) if math.isnan(bad) else total == math.inf  # (-inf)**2 = +inf


@pytest.mark.kernel("sum_squares")
@pytest.mark.parametrize("dtype", [np.float16, bfloat16, np.float32], ids=dtype_id)
@pytest.mark.parametrize("bad", [None, np.inf, -np.inf, np.nan], ids=["finite", "inf", "-inf", "nan"])
def test_sum_squares_is_finite_exactly_when_every_value_is(backend, dtype, bad):
    """The engine's overflow test for 16/32-bit gradients (refimpl/engine.py): the float64 sum of squares of the
    largest finite values cannot overflow, and one non-finite value makes it non-finite."""
    x = np.full(4097, ml_dtypes.finfo(dtype).max, dtype=dtype)
    if bad is not None:
        x[1234] = bad
    assert math.isfinite(run_kernel(backend, "sum_squares", x)) == (bad is None)


# ---------------------------------------------------------------------------------------- has_inf_or_nan
@pytest.mark.kernel("has_inf_or_nan")
@given(dtype=float_dtypes(), shape=shapes(max_dims=3, max_size=33), seed=seeds, large=st.booleans(),
       poison=st.sampled_from([None, np.inf, -np.inf, np.nan]))
def test_has_inf_or_nan(backend, dtype, shape, seed, large, poison):
    # large: values near the dtype's max, finite, whose sum overflows
    scale = float(ml_dtypes.finfo(dtype).max) / 6.1 if large else 1.0
    x = random_array(seed, shape, dtype, scale=scale)
    if poison is not None:
        x.reshape(-1)[np.random.default_rng(seed).integers(x.size)] = poison
    found = run_kernel(backend, "has_inf_or_nan", x)
    assert isinstance(found, (bool, np.bool_)), f"has_inf_or_nan returned {type(found).__name__}"
    assert bool(found) == any(not math.isfinite(e) for e in f64(x).reshape(-1))


@pytest.mark.kernel("has_inf_or_nan")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_has_inf_or_nan_max_finite_values(backend, dtype):
    x = np.full(4096, ml_dtypes.finfo(dtype).max, dtype=dtype)  # the sum is inf, every value finite
    assert not run_kernel(backend, "has_inf_or_nan", x)
    x[-1] = np.inf
    assert run_kernel(backend, "has_inf_or_nan", x)


# -------------------------------------------------------------------------------------------------- cast
def bf16_round_nearest_even(x32):
    """float32 -> bfloat16 by bit arithmetic (independent of ml_dtypes): add 0x7FFF plus the lowest kept
    bit, then drop the low 16 bits. Overflow carries into the exponent and gives inf. (No NaN inputs.)"""
    bits = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).view(bfloat16)


@pytest.mark.kernel("cast")
@pytest.mark.parametrize("lowp", LOW_PRECISION, ids=dtype_id)
@given(shape=shapes(max_dims=3, max_size=33), seed=seeds, scale=st.sampled_from([1.0, 1e3, 2e4]))
def test_cast_round_trip(backend, lowp, shape, seed, scale):
    # scale 2e4: |x| up to 1.2e5, beyond float16's 65504, so some values round to +-inf
    x = random_array(seed, shape, np.float32, scale=scale)
    y = run_kernel(backend, "cast", x, lowp)
    assert np.dtype(y.dtype) == np.dtype(lowp) and y.shape == x.shape
    with np.errstate(over="ignore"):
        independent = bf16_round_nearest_even(x) if lowp is bfloat16 else x.astype(np.float64).astype(lowp)
    np.testing.assert_array_equal(y.view(np.uint16), independent.view(np.uint16))  # bit exact

    back = run_kernel(backend, "cast", y, np.float32)
    assert np.dtype(back.dtype) == np.float32
    np.testing.assert_array_equal(back, y.astype(np.float32))  # widening is exact
    # round to nearest: |error| <= u |x| (u = 2**-11, 2**-8), or half the smallest subnormal below normals
    info = ml_dtypes.finfo(lowp)
    in_range = np.isfinite(back)
    err = np.abs(f64(back) - f64(x))[in_range]
    bound = float(info.eps) / 2 * np.abs(f64(x))[in_range] + float(info.smallest_subnormal) / 2
    assert (err <= bound).all(), f"fp32 -> {np.dtype(lowp).name} -> fp32 error {err.max()} beyond half an ulp"
    again = run_kernel(backend, "cast", back, lowp)
    np.testing.assert_array_equal(again.view(np.uint16), y.view(np.uint16))  # lowp -> fp32 -> lowp is identity


@pytest.mark.kernel("cast")
@pytest.mark.parametrize("lowp, cases", [
    (np.float16, [(2049.0, 2048.0), (2051.0, 2052.0),                  # ties go to the even neighbour
                  (65519.0, 65504.0), (65520.0, np.inf), (-1e6, -np.inf),  # rounding into overflow
                  (-0.0, -0.0), (np.inf, np.inf)]),
    (bfloat16, [(1 + 2**-8, 1.0), (1 + 3 * 2**-8, 1 + 2**-6), (1 + 2**-8 + 2**-20, 1 + 2**-7),
                (-0.0, -0.0), (-np.inf, -np.inf)]),
], ids=["float16", "bfloat16"])
def test_cast_rounds_to_nearest_even(backend, lowp, cases):
    x = np.array([c[0] for c in cases], dtype=np.float32)
    y = run_kernel(backend, "cast", x, lowp)
    for (src, want), got in zip(cases, f64(y)):
        assert got == want and math.copysign(1, got) == math.copysign(1, want), f"{src} -> {got}, want {want}"
    nan = run_kernel(backend, "cast", np.array([np.nan], np.float32), lowp)
    assert math.isnan(float(f64(nan)[0]))


@pytest.mark.kernel("cast")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_cast_returns_a_new_array(backend, dtype):
    x = backend.asarray(random_array(0, (17,), dtype))
    before = np.array(backend.to_numpy(x), copy=True)
    y = backend.cast(x, dtype)  # same dtype: still a copy, never a view of x
    y[...] = 0
    np.testing.assert_array_equal(f64(backend.to_numpy(x)), f64(before))
