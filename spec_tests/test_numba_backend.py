"""numba-specific checks the shared spec tests do not reach (backends/refimpl_numba).

- Without numba, selecting the backend says how to install it (this test needs no numba).
- The fused AdamW's fp16/bf16 copy-out is computed with bit arithmetic inside the kernel (numba has no
  float16 and cannot see ml_dtypes.bfloat16); the spec tests' values are bounded, so here it meets the
  edges of float16/bfloat16: overflow to inf, ties, subnormals, underflow to signed zero.
- Arrays the fused kernel cannot update through a flat view (strided) still get the reference's update.
"""
import sys

import ml_dtypes
import numpy as np
import pytest

from refimpl.backend import BackendError, available_backends
from refimpl.kernels import optim as ref

bfloat16 = ml_dtypes.bfloat16


def test_numba_missing_says_install_refimpl_numba(monkeypatch):
    from refimpl_numba import NumbaBackend
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    with pytest.raises(BackendError, match=r"install refimpl\[numba\]"):
        NumbaBackend.check_available()
    assert "install refimpl[numba]" in available_backends()["numba"]


@pytest.fixture(scope="module")
def numba_backend():
    pytest.importorskip("numba", reason="numba not installed")
    from refimpl.backend import get_backend
    return get_backend("numba")


def _edge_values():
    """float32 values at float16/bfloat16 edges, plus random bit patterns over the whole finite range."""
    f16 = [65504.0, 65519.0, 65520.0, 7e4, 2049.0, 2051.0, 6.1035156e-05, 6.09e-05, 2 ** -24, 2 ** -25,
           1.5 * 2 ** -25, 2 ** -26, 3 * 2 ** -25, 1e-30, 0.0, -0.0, 1.0, -1.0]
    bf16 = [1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.3895314e38, 3.4028235e38, 1.1754944e-38]
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, size=4000, dtype=np.uint64).astype(np.uint32)
    random = bits.view(np.float32)
    edges = np.array(f16 + bf16, dtype=np.float32)
    x = np.concatenate([edges, -edges, random[np.isfinite(random)]])
    return x


@pytest.mark.parametrize("lowp", [np.float16, bfloat16], ids=["float16", "bfloat16"])
def test_adam_copy_out_rounds_like_astype_at_the_edges(numba_backend, lowp):
    # lr = 0 and no decay: param is left as it is, so the copy-out is exactly cast(param).
    param = _edge_values()
    out = np.zeros(param.shape, lowp)
    zeros = np.zeros_like(param)
    numba_backend.adam_step(param, zeros, zeros.copy(), zeros.copy(), lr=0.0, beta1=0.9, beta2=0.999,
                            eps=1e-8, weight_decay=0.0, step=1, out_lowp=out)
    with np.errstate(over="ignore"):
        expected = param.astype(lowp)
    np.testing.assert_array_equal(out.view(np.uint16), expected.view(np.uint16))  # bit exact


@pytest.mark.parametrize("grad_dtype", [np.float16, bfloat16], ids=["float16", "bfloat16"])
def test_adam_low_precision_grads_decode_exactly(numba_backend, grad_dtype):
    """Every finite float16 / bfloat16 bit pattern as a gradient: the fused kernel decodes it in-kernel,
    the reference upcasts with astype; the updates must agree bit for bit."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    grad = bits.view(grad_dtype)
    grad = grad[np.isfinite(grad.astype(np.float32))]
    states = [np.full(grad.shape, 0.5, np.float32), np.full(grad.shape, 0.1, np.float32),
              np.full(grad.shape, 0.01, np.float32)]
    mine = [s.copy() for s in states]
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, grad_scale=4.0)
    with np.errstate(over="ignore", invalid="ignore"):
        ref.adam_step(*states[:1], grad, *states[1:], **hp)
        numba_backend.adam_step(*mine[:1], grad, *mine[1:], **hp)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), mine, states):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_adam_strided_state_is_updated_in_place(numba_backend):
    """A strided param has no flat view; the step must still land in the caller's arrays (and match)."""
    rng = np.random.default_rng(1)
    big = rng.standard_normal(20).astype(np.float32)
    grad = rng.standard_normal(10).astype(np.float32)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1)
    param, m, v = big[::2], np.zeros(10, np.float32), np.zeros(10, np.float32)
    expected = param.copy(), m.copy(), v.copy()
    ref.adam_step(expected[0], grad, expected[1], expected[2], **hp)
    numba_backend.adam_step(param, grad, m, v, **hp)
    for a, b in zip((big[::2], m, v), expected):
        np.testing.assert_array_equal(a, b)


def test_vectorised_exp_and_tanh_edges_and_accuracy():
    """_vmath's float32 exp / tanh (used by softmax, cross-entropy, GELU, attention): a few ulps over the
    whole range, exact 0 below the smallest normal and for -inf (masked scores), inf above, nan kept."""
    pytest.importorskip("numba", reason="numba not installed")
    from numba import njit

    from refimpl_numba._vmath import vexp, vtanh

    @njit
    def both(x):
        e, t = np.empty_like(x), np.empty_like(x)
        for i in range(x.size):
            e[i], t[i] = vexp(x[i]), vtanh(x[i])
        return e, t

    x = np.concatenate([np.linspace(-100, 100, 200_001, dtype=np.float32),
                        np.array([np.inf, -np.inf, np.nan, 0.0, -87.4, 88.8], np.float32)])
    e, t = both(x)
    exact = np.exp(x.astype(np.float64))
    normal = (exact > np.finfo(np.float32).tiny) & (exact < np.finfo(np.float32).max)
    assert np.max(np.abs(e[normal] - exact[normal]) / exact[normal]) < 16 * 2.0 ** -24
    assert np.all(e[exact <= np.finfo(np.float32).tiny] == 0)
    assert np.all(np.isposinf(e[exact >= np.finfo(np.float32).max]))
    assert np.isnan(e[-4]) and np.isnan(t[-4]) and e[-5] == 0
    assert np.nanmax(np.abs(t - np.tanh(x.astype(np.float64)))) < 4 * 2.0 ** -24
    assert t[-6] == 1 and t[-5] == -1
