"""Tests for refimpl/kernels/optim.py (reference optimizer kernels) and refimpl/optim.py.

Expected values come from float64 formulas written here, hand-worked sequences (loss scaler,
LR schedules) or torch (crosscheck), never from the code under test.
"""
import json
import math
import types

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.kernels import optim as kernels
from refimpl import optim

BF16 = ml_dtypes.bfloat16
EPS32 = float(np.finfo(np.float32).eps)


def _stand_in_backend():
    """The slice of the backend interface refimpl.optim uses, built from the reference kernels."""
    return types.SimpleNamespace(
        xp=np, adam_step=kernels.adam_step, sum_squares=kernels.sum_squares,
        has_inf_or_nan=kernels.has_inf_or_nan, cast=kernels.cast,
        zeros=lambda s, d: np.zeros(s, d), to_numpy=np.asarray)


@pytest.fixture
def backend():
    return _stand_in_backend()


# ---------------------------------------------------------------------------------------------
# adam_step vs an independent float64 implementation
# ---------------------------------------------------------------------------------------------

def adam_reference_f64(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step,
                       grad_scale, adamw_mode):
    """Textbook Adam/AdamW (Kingma & Ba Alg. 1; Loshchilov & Hutter Alg. 2) in float64."""
    p = param.astype(np.float64)
    g = grad.astype(np.float64) / grad_scale
    if adamw_mode:
        p = p - lr * weight_decay * p
    else:
        g = g + weight_decay * p
    m = beta1 * m.astype(np.float64) + (1 - beta1) * g
    v = beta2 * v.astype(np.float64) + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** step)
    v_hat = v / (1 - beta2 ** step)
    update = lr * m_hat / (np.sqrt(v_hat) + eps)
    return p - update, m, v, update


@given(
    n=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    lr=st.floats(1e-5, 1e-1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.9, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
    step=st.integers(1, 2000),
    grad_scale=st.sampled_from([1.0, 2.0**-3, 2.0**15, 1000.0, 3.7]),
    adamw_mode=st.booleans(),
    grad_dtype=st.sampled_from([np.float32, np.float16, BF16]),
)
def test_adam_step_matches_float64_formula(n, seed, lr, beta1, beta2, eps, weight_decay, step,
                                           grad_scale, adamw_mode, grad_dtype):
    rng = np.random.default_rng(seed)
    param = rng.standard_normal(n).astype(np.float32)
    # A loss-scaled gradient, kept inside fp16's range (overflowed steps are skipped, never stepped).
    grad = np.clip(rng.standard_normal(n) * grad_scale, -6e4, 6e4).astype(grad_dtype)
    m = (0.1 * rng.standard_normal(n)).astype(np.float32)
    v = (0.01 * rng.random(n)).astype(np.float32)
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
              grad_scale=grad_scale, adamw_mode=adamw_mode)
    p_ref, m_ref, v_ref, update_ref = adam_reference_f64(param, grad, m, v, **hp)

    # Error bounds built from the magnitudes of the terms fp32 rounds, so cancellation is allowed for.
    g_mag = np.abs(grad.astype(np.float64) / grad_scale)
    if not adamw_mode:
        g_mag = g_mag + weight_decay * np.abs(param)
    m_mag = beta1 * np.abs(m) + (1 - beta1) * g_mag
    v_mag = v_ref + (1 - beta2) * g_mag ** 2
    denom = np.sqrt(v_ref / (1 - beta2 ** step)) + eps
    u_mag = lr / (1 - beta1 ** step) * m_mag / denom + np.abs(update_ref)

    p32, g_in = param.copy(), grad.copy()
    kernels.adam_step(p32, grad, m, v, **hp)
    assert np.array_equal(grad.view(np.uint8), g_in.view(np.uint8)), "grad must not be modified"
    assert np.all(np.abs(m - m_ref) <= 8 * EPS32 * m_mag + 1e-30)
    assert np.all(np.abs(v - v_ref) <= 8 * EPS32 * v_mag + 1e-30)
    assert np.all(np.abs(p32 - p_ref) <= 16 * EPS32 * (np.abs(param) + u_mag))


def test_adam_step_first_step_is_lr_sized_sign_step():
    # At step 1 with zero moments: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps):
    # a step of (almost exactly) lr against the sign of g, whatever |g| is.
    p = np.array([1.0, 1.0, 1.0], np.float32)
    g = np.array([1e-3, -5.0, 300.0], np.float32)
    m, v = np.zeros(3, np.float32), np.zeros(3, np.float32)
    kernels.adam_step(p, g, m, v, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-12, weight_decay=0.0, step=1)
    np.testing.assert_allclose(p, [0.99, 1.01, 0.99], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
def test_adam_step_out_lowp_is_cast_of_updated_param(dtype):
    rng = np.random.default_rng(0)
    p = (rng.standard_normal(1000) * 100).astype(np.float32)
    g = rng.standard_normal(1000).astype(np.float32)
    m, v = np.zeros(1000, np.float32), np.zeros(1000, np.float32)
    out = np.full(1000, 7, dtype)
    kernels.adam_step(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                      step=1, out_lowp=out)
    expected = p.astype(dtype)                       # numpy/ml_dtypes' own round-to-nearest-even
    assert out.dtype == np.dtype(dtype)
    assert np.array_equal(out.view(np.uint8), expected.view(np.uint8))
    if dtype is not np.float32:
        assert not np.array_equal(out.astype(np.float32), p), "low precision should round something"


def test_adam_step_rejects_bad_input():
    p, m, v = (np.zeros(4, np.float32) for _ in range(3))
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="grad has shape"):
        kernels.adam_step(p, np.zeros(5, np.float32), m, v, step=1, **hp)
    with pytest.raises(ValueError, match="step must be"):
        kernels.adam_step(p, np.zeros(4, np.float32), m, v, step=0, **hp)
    with pytest.raises(ValueError, match="exp_avg must be float32"):
        kernels.adam_step(p, np.zeros(4, np.float32), m.astype(np.float64), v, step=1, **hp)
    with pytest.raises(ValueError, match="grad_scale"):
        kernels.adam_step(p, np.zeros(4, np.float32), m, v, step=1, grad_scale=0.0, **hp)
    with pytest.raises(ValueError, match="out_lowp has shape"):
        kernels.adam_step(p, np.zeros(4, np.float32), m, v, step=1, out_lowp=np.zeros(3, np.float16), **hp)


# ---------------------------------------------------------------------------------------------
# sum_squares / has_inf_or_nan / cast on crafted inputs
# ---------------------------------------------------------------------------------------------

def test_sum_squares_crafted():
    assert kernels.sum_squares(np.array([3.0, 4.0], np.float32)) == 25.0
    assert isinstance(kernels.sum_squares(np.array([1.0], np.float32)), float)
    # 300^2 = 90000 overflows fp16 (max 65504): the square must be taken after upcasting.
    assert kernels.sum_squares(np.array([300.0, -300.0], np.float16)) == 180000.0
    assert kernels.sum_squares(np.array([256.0, 0.5], BF16)) == 65536.25
    # float32 accumulation would lose the ten 1's next to 1e8 (fp32 ulp at 1e8 is 8); float64 keeps them.
    x = np.array([1e4] + [1.0] * 10, np.float32)
    assert kernels.sum_squares(x) == 1e8 + 10
    # More elements than one accumulation block, in a 2-D array.
    assert kernels.sum_squares(np.ones((1025, 1024), np.float16)) == 1025 * 1024
    assert kernels.sum_squares(np.zeros(0, np.float32)) == 0.0
    assert kernels.sum_squares(np.array([1.0, np.inf], np.float16)) == math.inf
    assert math.isnan(kernels.sum_squares(np.array([1.0, np.nan], BF16)))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
def test_has_inf_or_nan_crafted(dtype):
    big = float(ml_dtypes.finfo(dtype).max)          # ml_dtypes.finfo also covers bfloat16
    assert kernels.has_inf_or_nan(np.array([0.0, -1.0, big, -big], dtype)) is False
    assert kernels.has_inf_or_nan(np.zeros(0, dtype)) is False
    for bad in (np.inf, -np.inf, np.nan):
        x = np.ones(17, dtype)
        x[11] = bad
        assert kernels.has_inf_or_nan(x) is True
        assert kernels.has_inf_or_nan(x.reshape(1, 17)) is True


def test_has_inf_or_nan_not_fooled_by_a_sum_that_overflows():
    # Every element is finite, but their fp16 sum would be inf (DeepSpeed's sum-based check says overflow).
    assert kernels.has_inf_or_nan(np.full(10, 60000.0, np.float16)) is False


def test_cast_rounds_to_nearest_even():
    f32 = np.float32
    # fp16 has 10 mantissa bits: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 -> even (1.0);
    # 1 + 3*2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9 -> even (1 + 2^-9).
    x = np.array([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20, 65519.0, 65520.0, -0.0, np.nan], f32)
    y = kernels.cast(x, np.float16)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y[:4].astype(np.float64), [1.0, 1 + 2**-9, 1 + 2**-10, 65504.0])
    assert y[4] == np.inf                            # 65520 ties 65504 and 65536 (=inf): even -> inf
    assert np.signbit(y[5]) and y[5] == 0 and np.isnan(y[6])
    # bf16 has 7 mantissa bits: same tie rule one level up; f32 max rounds up past bf16 max to inf.
    # 3.0e38 = 2^127 * 1.7633...: with 7 mantissa bits that is 225.7/128 -> 226/128, i.e. 226 * 2^120.
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, np.finfo(f32).max, 3.0e38], f32)
    y = kernels.cast(x, BF16)
    assert y.dtype == np.dtype(BF16)
    np.testing.assert_array_equal(y[[0, 1, 3]].astype(np.float64), [1.0, 1 + 2**-6, 226 * 2.0**120])
    assert y[2].astype(np.float64) == np.inf
    # Up-casts are exact, and the result is a new array.
    z = kernels.cast(y, np.float32)
    assert z[0] == 1.0 and z[1] == 1 + 2**-6
    src = np.ones(3, np.float32)
    out = kernels.cast(src, np.float32)
    out[0] = 5
    assert src[0] == 1.0


# ---------------------------------------------------------------------------------------------
# AdamW class (stand-in backend)
# ---------------------------------------------------------------------------------------------

def test_adamw_constructor_refuses_bad_arguments(backend):
    with pytest.raises(ValueError, match="master must be a flat float32"):
        optim.AdamW(np.zeros((2, 4), np.float32), backend=backend)
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0"):
        optim.AdamW(np.zeros(8, np.float32), backend=backend, betas=(0.9, 1.0))


def test_adamw_step_writes_low_precision_copy(backend):
    opt = optim.AdamW(np.linspace(-1, 1, 16).astype(np.float32), backend=backend, lr=0.1)
    out = np.zeros(16, np.float16)
    opt.step(np.ones(16, np.float16) * 4, grad_scale=4.0, out_lowp=out, lr=0.5)
    assert np.array_equal(out, opt.master.astype(np.float16))
    # grad/grad_scale = 1 everywhere: first step moves every weight by ~lr=0.5 down (plus decay).
    np.testing.assert_allclose(opt.master, np.linspace(-1, 1, 16) * (1 - 0.5 * 0.01) - 0.5, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# torch cross-checks: AdamW / Adam over 20 steps
# ---------------------------------------------------------------------------------------------

@pytest.mark.crosscheck
@pytest.mark.parametrize("adamw_mode", [True, False])
def test_adamw_matches_torch_over_20_steps(adamw_mode):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    n, wd = 257, 0.05
    w0 = rng.standard_normal(n).astype(np.float32)
    grads = [(rng.standard_normal(n) * (0.1 + k)).astype(np.float32) for k in range(20)]
    sched = {"type": "WarmupCosineLR",
             "params": {"total_num_steps": 20, "warmup_num_steps": 5, "warmup_type": "linear"}}
    lrs = [optim.lr_at(k, sched, 3e-2) for k in range(20)]   # a changing lr, as in training

    ours = optim.AdamW(w0.copy(), backend=_stand_in_backend(), lr=3e-2, betas=(0.9, 0.99), eps=1e-8,
                       weight_decay=wd, adamw_mode=adamw_mode)
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    topt = topt_cls([tp], lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    scale = 1024.0                                   # loss-scaled grads in, unscaled by grad_scale
    for g, lr in zip(grads, lrs):
        ours.step((g * scale).astype(np.float32), lr=lr, grad_scale=scale)
        topt.param_groups[0]["lr"] = lr
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    state = topt.state[tp]
    # ~1e-6 relative to each array's scale: torch's moment update is a lerp (with FMA), ours is
    # b1*m + (1-b1)*g, so elements where these terms cancel differ by a few ulps of the terms.
    for got, want in ((ours.master, tp.detach().numpy()), (ours.exp_avg, state["exp_avg"].numpy()),
                      (ours.exp_avg_sq, state["exp_avg_sq"].numpy())):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert int(state["step"]) == ours.step_count == 20


# ---------------------------------------------------------------------------------------------
# Dynamic loss scaler: scripted sequences worked out by hand from DeepSpeed's rules
# ---------------------------------------------------------------------------------------------

def _run(scaler, overflows):
    scales, hysteresis = [], []
    for of in overflows:
        scaler.update_scale(of)
        scales.append(scaler.loss_scale)
        hysteresis.append(scaler.cur_hysteresis)
    return scales, hysteresis


def test_loss_scaler_window_counts_clean_steps_since_last_overflow():
    # DeepSpeed's rule: s = cur_iter - last_overflow_iter - 1 (last_overflow_iter = -1 at start), and a clean
    # iteration with s > 0 and s % window == 0 doubles. No hysteresis, window 3, start 16:
    # iters 0..2 clean (s = 0, 1, 2) keep 16; iter 3 overflows -> 8, last_overflow_iter = 3;
    # iters 4..6 (s = 0, 1, 2) keep 8; iter 7 (s = 3: the 4th clean iteration) doubles to 16;
    # iters 8, 9 (s = 4, 5) keep 16; iter 10 (s = 6) doubles to 32.
    s = optim.DynamicLossScaler(init_scale=16, scale_window=3, delayed_shift=1)
    F, T = False, True
    scales, _ = _run(s, [F, F, F, T, F, F, F, F, F, F, F])
    assert scales == [16, 16, 16, 8, 8, 8, 8, 16, 16, 16, 32]
    assert s.cur_iter == 11 and s.last_overflow_iter == 3
    # From the start: window 10 doubles on the 11th clean iteration (iter 10), not the 10th.
    s = optim.DynamicLossScaler(init_scale=2**24, scale_window=10)
    scales, _ = _run(s, [F] * 21)
    assert scales.index(2**25) == 10 and scales.index(2**26) == 20


def test_loss_scaler_hysteresis_delays_first_decrease():
    # hysteresis (delayed_shift) 2, window 4, start 16, non-consecutive:
    # it0 overflow: credit 2 -> 1, scale stays 16      it1 overflow: credit is 1 -> halve to 8
    # it2 overflow: credit still 1 -> 4                it3 clean (s = 0): 4, credit stays 1
    # it4 overflow: credit 1 -> halve to 2 (last=4)    it5..it8 clean (s = 0..3): 2
    # it9 clean (s = 4, 4 % 4 == 0): double to 4 and restore credit to 2
    # it10 overflow: credit 2 -> 1, scale stays 4      it11 overflow: credit 1 -> 2
    s = optim.DynamicLossScaler(init_scale=16, scale_window=4, delayed_shift=2)
    F, T = False, True
    scales, hyst = _run(s, [T, T, T, F, T, F, F, F, F, F, T, T])
    assert scales == [16, 8, 4, 4, 2, 2, 2, 2, 2, 4, 4, 2]
    assert hyst == [1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1]


def test_loss_scaler_consecutive_hysteresis_resets_on_any_clean_step():
    # hysteresis 2, window 100 (never grows here), start 16, overflow pattern T F T F T T T.
    # consecutive: every clean step restores the credit, so isolated overflows never cut the scale:
    # it0 T: credit 1, 16 | it1 F: credit 2 | it2 T: credit 1, 16 | it3 F: credit 2 |
    # it4 T: credit 1, 16 | it5 T: credit was 1 -> 8 | it6 T: -> 4
    F, T = False, True
    pattern = [T, F, T, F, T, T, T]
    s = optim.DynamicLossScaler(init_scale=16, scale_window=100, delayed_shift=2, consecutive_hysteresis=True)
    scales, hyst = _run(s, pattern)
    assert scales == [16, 16, 16, 16, 16, 8, 4]
    assert hyst == [1, 2, 1, 2, 1, 1, 1]
    # Same pattern without consecutive_hysteresis: the credit spent at it0 is not restored by clean
    # steps (only by a full window), so it2 already halves: 16, 16, 8, 8, 4, 2, 1.
    s = optim.DynamicLossScaler(init_scale=16, scale_window=100, delayed_shift=2)
    assert _run(s, pattern)[0] == [16, 16, 8, 8, 4, 2, 1]


def test_loss_scaler_min_scale_floor_and_error():
    # start 4, floor 1, not raising: overflows give 2, 1, then stay at 1 (max(1/2, 1)).
    s = optim.DynamicLossScaler(init_scale=4, min_scale=1, delayed_shift=1, raise_error_at_min_scale=False)
    assert _run(s, [True] * 4)[0] == [2, 1, 1, 1]
    # A floor that is not a power of two: 8 -> 4 -> max(2, 3) = 3 -> 3.
    s = optim.DynamicLossScaler(init_scale=8, min_scale=3, delayed_shift=1, raise_error_at_min_scale=False)
    assert _run(s, [True] * 3)[0] == [4, 3, 3]
    # By default (DeepSpeed's engine) the overflow *at* the floor raises.
    s = optim.DynamicLossScaler(init_scale=4, min_scale=1, delayed_shift=1)
    assert _run(s, [True, True])[0] == [2, 1]
    with pytest.raises(optim.MinLossScaleError, match="min_scale=1"):
        s.update_scale(True)
    # ... but not while hysteresis still has credit: that overflow only spends the credit.
    s = optim.DynamicLossScaler(init_scale=1, min_scale=1, delayed_shift=2)
    s.update_scale(True)
    assert (s.loss_scale, s.cur_hysteresis) == (1, 1)
    with pytest.raises(optim.MinLossScaleError):
        s.update_scale(True)


def test_loss_scaler_window_one_doubles_every_clean_step_but_the_first():
    # window 1: every clean iteration with s > 0 doubles; the first clean one after an overflow has s = 0.
    s = optim.DynamicLossScaler(init_scale=1, scale_window=1, delayed_shift=1)
    assert _run(s, [False, False, False, True, False, False])[0] == [1, 2, 4, 2, 2, 4]


def test_loss_scaler_state_dict_resume_and_json():
    pattern = [True, False, False, True, True, False, False, False, True, False] * 3
    full = optim.DynamicLossScaler(init_scale=2**20, scale_window=3, delayed_shift=2)
    expected = _run(full, pattern)[0]
    a = optim.DynamicLossScaler(init_scale=2**20, scale_window=3, delayed_shift=2)
    first = _run(a, pattern[:13])[0]
    state = json.loads(json.dumps(a.state_dict()))   # survives a JSON manifest
    b = optim.DynamicLossScaler()
    b.load_state_dict(state)
    assert first + _run(b, pattern[13:])[0] == expected
    with pytest.raises(ValueError, match="missing keys"):
        b.load_state_dict({"cur_scale": 1.0})
    with pytest.raises(ValueError, match="static"):
        b.load_state_dict({**state, "dynamic": False})
    static = optim.StaticLossScaler()
    static.load_state_dict(json.loads(json.dumps(optim.StaticLossScaler(128).state_dict())))
    assert static.loss_scale == 128.0


def test_loss_scaler_from_config_and_make_loss_scaler():
    # DeepSpeed's fp16 defaults: initial_scale_power 16, window 1000, hysteresis 2, min 1.
    s = optim.DynamicLossScaler.from_config({})
    assert (s.loss_scale, s.scale_window, s.delayed_shift, s.min_scale, s.consecutive_hysteresis) \
        == (65536.0, 1000, 2, 1.0, False)
    s = optim.DynamicLossScaler.from_config({"initial_scale_power": 5, "loss_scale_window": 7,
                                             "hysteresis": 3, "consecutive_hysteresis": True,
                                             "min_loss_scale": 0.25})
    assert (s.loss_scale, s.scale_window, s.cur_hysteresis, s.min_scale, s.consecutive_hysteresis) \
        == (32.0, 7, 3, 0.25, True)

    dyn = optim.make_loss_scaler({"fp16": {"enabled": True}})
    assert isinstance(dyn, optim.DynamicLossScaler) and dyn.loss_scale == 2.0**16
    static = optim.make_loss_scaler({"fp16": {"enabled": True, "loss_scale": 128}})
    assert isinstance(static, optim.StaticLossScaler) and static.loss_scale == 128.0
    static.update_scale(True)
    assert static.loss_scale == 128.0
    for cfg in ({}, {"bf16": {"enabled": True}}, {"fp16": {"enabled": False, "loss_scale": 0}}):
        sc = optim.make_loss_scaler(cfg)
        assert isinstance(sc, optim.StaticLossScaler) and sc.loss_scale == 1.0
    with pytest.raises(ValueError, match="both true"):
        optim.make_loss_scaler({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    with pytest.raises(ValueError, match="fp16.loss_scale=-1"):
        optim.make_loss_scaler({"fp16": {"enabled": True, "loss_scale": -1}})
    with pytest.raises(ValueError, match="scale_window=0"):
        optim.DynamicLossScaler(scale_window=0)


# ---------------------------------------------------------------------------------------------
# Global norm and clipping
# ---------------------------------------------------------------------------------------------

def test_clip_coefficient_rules():
    assert optim.clip_coefficient(10.0, 1.0) == 1.0 / (10.0 + 1e-6)
    assert optim.clip_coefficient(0.5, 1.0) == 1.0           # never amplifies
    assert optim.clip_coefficient(1.0, 1.0) == 1.0 / (1.0 + 1e-6)  # the 1e-6 makes this just below 1
    assert optim.clip_coefficient(100.0, 0.0) == 1.0          # gradient_clipping: 0 disables
    assert optim.clip_coefficient(100.0, -1.0) == 1.0
    assert optim.clip_coefficient(math.inf, 1.0) == 0.0


@pytest.mark.crosscheck
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_matches_torch_clip_grad_norm(max_norm):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(n).astype(np.float32) for n in (5, 17, 100)]
    params = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.from_numpy(g.copy())
    torch_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    be = _stand_in_backend()
    norm = math.sqrt(sum(be.sum_squares(g) for g in grads))   # the engine's global norm
    assert norm == pytest.approx(torch_norm, rel=1e-6)
    coef = optim.clip_coefficient(norm, max_norm)
    assert (coef < 1.0) == (max_norm == 0.5)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(g * np.float32(coef), p.grad.numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# LR schedules
# ---------------------------------------------------------------------------------------------

def _cfg(kind, **params):
    return {"type": kind, "params": params}


def test_lr_at_no_scheduler_is_base_lr():
    assert optim.lr_at(0, None, 3e-4) == 3e-4
    assert optim.lr_at(12345, None, 3e-4) == 3e-4


def test_warmup_lr_hand_computed():
    # Optimizer step k uses DeepSpeed's get_lr() at last_batch_iteration i = k - 1.
    lin = _cfg("WarmupLR", warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10, warmup_type="linear")
    assert optim.lr_at(0, lin, 1.0) == 0.0            # i = -1: the constructor's value, warmup_min_lr
    assert optim.lr_at(1, lin, 1.0) == 0.0            # i = 0: gamma = 0/10
    assert optim.lr_at(6, lin, 1.0) == pytest.approx(0.05)   # i = 5: gamma = 0.5
    assert optim.lr_at(10, lin, 1.0) == pytest.approx(0.09)  # i = 9: last warmup value, 0.9
    assert optim.lr_at(11, lin, 1.0) == 0.1           # i = 10 = W: warmup over
    assert optim.lr_at(10**6, lin, 1.0) == 0.1
    log = _cfg("WarmupLR", warmup_min_lr=0.01, warmup_max_lr=0.1, warmup_num_steps=100)  # log default
    assert optim.lr_at(1, log, 1.0) == pytest.approx(0.01)   # log(1) = 0
    assert optim.lr_at(10, log, 1.0) == pytest.approx(0.055)  # i = 9: log(10)/log(100) = 1/2
    assert optim.lr_at(100, log, 1.0) == pytest.approx(0.1)   # i = 99: log(100)/log(100) = 1
    # warmup_max_lr omitted -> the optimizer's lr; warmup_num_steps 1 is raised to 2 (0 is an error).
    assert optim.lr_at(500, _cfg("WarmupLR", warmup_num_steps=10), 0.7) == 0.7
    assert optim.lr_at(2, _cfg("WarmupLR", warmup_max_lr=1.0, warmup_num_steps=1, warmup_type="linear"),
                       1.0) == 0.5                    # i = 1 of W = 2


def test_warmup_decay_lr_hand_computed():
    cfg = _cfg("WarmupDecayLR", total_num_steps=110, warmup_min_lr=0.0, warmup_max_lr=0.1,
               warmup_num_steps=10, warmup_type="linear")
    assert optim.lr_at(0, cfg, 1.0) == 0.0
    assert optim.lr_at(6, cfg, 1.0) == pytest.approx(0.05)   # mid-warmup, i = 5
    assert optim.lr_at(11, cfg, 1.0) == 0.1                  # i = 10: (110 - 10) / 100 = 1, the peak
    assert optim.lr_at(61, cfg, 1.0) == pytest.approx(0.05)  # mid-decay, i = 60: 50/100
    assert optim.lr_at(110, cfg, 1.0) == pytest.approx(0.001)  # i = 109: 1/100
    assert optim.lr_at(111, cfg, 1.0) == 0.0                 # i = 110 = T: decayed to warmup_min_lr
    assert optim.lr_at(500, cfg, 1.0) == 0.0                 # clamped at 0, never negative
    # DeepSpeed's WarmupDecayLR defaults warmup_max_lr to 0.001 (not the optimizer's lr).
    assert optim.lr_at(11, _cfg("WarmupDecayLR", total_num_steps=110, warmup_num_steps=10), 5.0) == 0.001


def test_warmup_cosine_lr_hand_computed():
    cfg = _cfg("WarmupCosineLR", total_num_steps=110, warmup_num_steps=10, warmup_min_ratio=0.2,
               cos_min_ratio=0.1, warmup_type="linear")
    base = 0.1
    assert optim.lr_at(0, cfg, base) == 0.0                  # i = -1: DeepSpeed returns 0.0
    assert optim.lr_at(1, cfg, base) == pytest.approx(0.02)  # i = 0: ratio = warmup_min_ratio 0.2
    assert optim.lr_at(6, cfg, base) == pytest.approx(0.06)  # i = 5: 0.2 + 0.5*0.8 = 0.6
    assert optim.lr_at(10, cfg, base) == pytest.approx(0.092)  # i = 9: 0.2 + 0.9*0.8 = 0.92
    # i = 10: first cosine step, s = 1 of S = 100: 0.1 + 0.9*(1 + cos(pi/100))/2 = 0.99977795...
    assert optim.lr_at(11, cfg, base) == pytest.approx(0.099977795, rel=1e-8)
    assert optim.lr_at(60, cfg, base) == pytest.approx(0.055)  # i = 59: s = 50, cos(pi/2) = 0: 0.55
    assert optim.lr_at(110, cfg, base) == pytest.approx(0.01)  # i = 109: s = S, cos(pi) = -1: 0.1
    # Past the end DeepSpeed 0.19.8 holds the floor (the cosine's progress is clamped at 1).
    assert [optim.lr_at(k, cfg, base) for k in (111, 150, 210, 10**6)] == [pytest.approx(0.01)] * 4


@given(kind=st.sampled_from(["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]),
       warmup=st.integers(1, 40), extra=st.integers(1, 80),
       warmup_type=st.sampled_from(["log", "linear"]),
       lo=st.floats(0.0, 0.5), hi=st.floats(0.5, 1.0))
def test_schedules_are_monotone_in_each_phase(kind, warmup, extra, warmup_type, lo, hi):
    W = max(2, warmup)
    T = W + extra
    if kind == "WarmupCosineLR":
        cfg = _cfg(kind, total_num_steps=T, warmup_num_steps=warmup, warmup_type=warmup_type,
                   warmup_min_ratio=lo, cos_min_ratio=lo)
    elif kind == "WarmupDecayLR":
        cfg = _cfg(kind, total_num_steps=T, warmup_num_steps=warmup, warmup_type=warmup_type,
                   warmup_min_lr=lo * 1e-3, warmup_max_lr=hi * 1e-3)
    else:
        cfg = _cfg(kind, warmup_num_steps=warmup, warmup_type=warmup_type,
                   warmup_min_lr=lo * 1e-3, warmup_max_lr=hi * 1e-3)
    lrs = [optim.lr_at(k, cfg, 1e-3) for k in range(T + 2)]
    up, down = lrs[:W + 1], lrs[W + 1:T + 1]       # steps 0..W warm up (i <= W-1), W+1..T decay
    assert all(a <= b * (1 + 1e-12) for a, b in zip(up, up[1:]))
    if kind == "WarmupLR":
        assert all(x == pytest.approx(hi * 1e-3) for x in lrs[W + 1:])
    else:
        assert all(a >= b * (1 - 1e-12) for a, b in zip(down, down[1:]))
        past = [optim.lr_at(k, cfg, 1e-3) for k in (T + 1, T + 2, 3 * T)]   # past the end: the floor, held
        assert past[0] == past[1] == past[2] <= min(lrs[W + 1:T + 1])
    assert all(x >= 0 for x in lrs)


def test_lr_at_rejects_bad_config():
    with pytest.raises(ValueError, match=r"OneCycle.*allowed: \['WarmupLR', 'WarmupDecayLR', 'WarmupCosineLR'\]"):
        optim.lr_at(3, _cfg("OneCycle"), 1.0)
    with pytest.raises(ValueError, match=r"unknown keys \['warmup_max_ratio'\]"):
        optim.lr_at(3, _cfg("WarmupCosineLR", total_num_steps=100, warmup_max_ratio=1.0), 1.0)
    with pytest.raises(ValueError, match="total_num_steps is required"):
        optim.lr_at(3, _cfg("WarmupDecayLR"), 1.0)
    with pytest.raises(ValueError, match="warmup_type='cosine'"):
        optim.lr_at(3, _cfg("WarmupLR", warmup_type="cosine"), 1.0)
    with pytest.raises(ValueError, match="total_num_steps=0 .*>= 1"):
        optim.lr_at(3, _cfg("WarmupCosineLR", total_num_steps=0, warmup_num_steps=10), 1.0)
    with pytest.raises(ValueError, match="warmup_num_steps=0 .*>= 1"):   # DeepSpeed 0.19.8 refuses it too
        optim.lr_at(3, _cfg("WarmupLR", warmup_num_steps=0), 1.0)
    # total <= warmup: DeepSpeed only warns; the run warms up, then holds cos_min_ratio (no alternation)
    short = _cfg("WarmupCosineLR", total_num_steps=10, warmup_num_steps=20, warmup_type="linear",
                 cos_min_ratio=0.1)
    assert optim.lr_at(5, short, 1.0) == pytest.approx(4 / 20)
    assert [optim.lr_at(k, short, 1.0) for k in range(21, 26)] == [pytest.approx(0.1)] * 5
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        optim.lr_at(-1, None, 1.0)
