"""Equivalence tests of attention / attention_backward (refimpl/kernels/attention.py) on every backend.

Both forms of the interface are tested: `block_size=None` (plain, materialised scores) and
`block_size=k` (FlashAttention tiling, Dao et al. 2022 / 2023), each against the plain float64
reference on the same inputs, with causal masks (diagonal aligned at the end, Tq != Tk included), key
padding masks and query rows that see no key at all (out = 0, lse = -inf, zero gradients, exactly).
The float64 reference is checked against a dense formula written here (np.tril for the causal mask,
logaddexp for the log-sum-exp) and its backward, in both forms, against central differences.

Tolerance scales come from absolute-value bounds (tolerances.py): a score S_ij = s q_i.k_j is off by
~u s|q_i|.|k_j|, which perturbs P relatively, so out is scaled by (P @ |V|) (1 + max s|q||k|), and the
gradients by the same bounds pushed through dS = P (dP - D_i), dQ = s dS K, dK = s dS^T Q, dV = P^T dO.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings

from refimpl.kernels import attention as ref

from .strategies import FLOAT_DTYPES, attention_problems, dtype_id
from .tolerances import assert_close, assert_grad_close, central_difference, run_kernel

all_dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
both_forms = pytest.mark.parametrize("form", ["plain", "tiled"])


def f64(a):
    return np.asarray(a).astype(np.float64)


def compute_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def allowed_keys(Tq, Tk, causal, key_padding_mask):
    """(B or 1, 1, Tq, Tk) bool: which keys each query may see, built independently of the kernels."""
    allowed = np.ones((Tq, Tk), dtype=bool)
    if causal:
        allowed = np.tril(allowed, k=Tk - Tq)  # query i sees keys j <= i + (Tk - Tq)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return allowed


def dense_attention(q, k, v, *, causal, key_padding_mask, scale):
    """Independent float64 attention: masked scores -> -inf, lse by logaddexp, P = exp(S - lse)."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    S = s * np.einsum("bhid,bhjd->bhij", q, k)                       # (B, H, Tq, Tk)
    S = np.where(allowed_keys(q.shape[2], k.shape[2], causal, key_padding_mask), S, -np.inf)
    with np.errstate(invalid="ignore"):
        lse = np.logaddexp.reduce(S, axis=-1)                        # (B, H, Tq), -inf: no key
    P = np.exp(S - np.where(np.isfinite(lse), lse, 0.0)[..., None])  # 0 where masked
    return P @ v, lse


def abs_bounds(q, k, v, *, causal, key_padding_mask, scale):
    """(P, |S| bound per row, s) in float64: the softmax and sum_d s|q_id||k_jd| maximised per row."""
    q, k, v = f64(q), f64(k), f64(v)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed = allowed_keys(q.shape[2], k.shape[2], causal, key_padding_mask)
    S_abs = np.where(allowed, s * (np.abs(q) @ np.abs(k).swapaxes(-1, -2)), 0.0)  # (B, H, Tq, Tk)
    _, lse = dense_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    S = np.where(allowed, s * (q @ k.swapaxes(-1, -2)), -np.inf)
    P = np.exp(S - np.where(np.isfinite(lse), lse, 0.0)[..., None])
    return P, S_abs.max(axis=-1), s                                  # (B,H,Tq,Tk), (B,H,Tq), float


# ----------------------------------------------------------------------------------------------- forward
@pytest.mark.kernel("attention")
@all_dtypes
@both_forms
@given(problem=attention_problems())
def test_attention(backend, dtype, form, problem):
    q, k, v, _ = problem.inputs(dtype)
    kw = problem.kw
    block = None if form == "plain" else problem.block_size
    out, lse = run_kernel(backend, "attention", q, k, v, block_size=block, **kw)
    eout, else_ = ref.attention(f64(q), f64(k), f64(v), **kw)

    P, row_abs, _ = abs_bounds(q, k, v, **kw)
    scale_out = (P @ np.abs(f64(v))) * (1.0 + row_abs[..., None])    # 0 on rows with no key: exact
    scale_lse = 1.0 + row_abs + np.abs(np.where(np.isfinite(else_), else_, 0.0))

    dense_out, dense_lse = dense_attention(f64(q), f64(k), f64(v), **kw)
    assert_close(eout, dense_out, np.float64, scale=scale_out, what="reference out vs dense formula")
    assert_close(else_, dense_lse, np.float64, scale=scale_lse, what="reference lse vs dense formula")

    cdt = compute_dtype(dtype)
    assert np.dtype(out.dtype) == np.dtype(dtype) and out.shape == eout.shape, (out.dtype, out.shape)
    assert np.dtype(lse.dtype) == np.dtype(cdt) and lse.shape == else_.shape, (lse.dtype, lse.shape)
    assert_close(out, eout, dtype, scale=scale_out, what=f"attention out ({form})")
    assert_close(lse, else_, cdt, scale=scale_lse, what=f"attention lse ({form})")


# ---------------------------------------------------------------------------------------------- backward
@pytest.mark.kernel("attention_backward")
@all_dtypes
@both_forms
@given(problem=attention_problems())
def test_attention_backward(backend, dtype, form, problem):
    q, k, v, dout = problem.inputs(dtype)
    kw = problem.kw
    out, lse = ref.attention(q, k, v, **kw)  # what forward saves: out in dtype, lse in the compute dtype
    block = None if form == "plain" else problem.block_size
    grads = run_kernel(backend, "attention_backward", dout, q, k, v, out, lse, block_size=block, **kw)
    expected = ref.attention_backward(*(f64(a) for a in (dout, q, k, v, out, lse)), **kw)

    # Bounds of the terms: dS = P (dP - D_i) with dP = dO V^T and D_i = rowsum(dO * O).
    P, row_abs, s = abs_bounds(q, k, v, **kw)
    P = P * (1.0 + row_abs[..., None])                                # P's own error grows with |S|
    dO, O = np.abs(f64(dout)), np.abs(f64(out))
    dS = P * (dO @ np.abs(f64(v)).swapaxes(-1, -2) + (dO * O).sum(axis=-1)[..., None])
    scales = (s * dS @ np.abs(f64(k)),                                # dQ = s dS K
              s * dS.swapaxes(-1, -2) @ np.abs(f64(q)),               # dK = s dS^T Q
              P.swapaxes(-1, -2) @ dO)                                # dV = P^T dO
    for name, g, e, sc, x in zip(("dq", "dk", "dv"), grads, expected, scales, (q, k, v)):
        assert np.dtype(g.dtype) == np.dtype(x.dtype) and g.shape == x.shape, (name, g.dtype, g.shape)
        assert_close(g, e, dtype, scale=sc, what=f"attention_backward {name} ({form})")


@pytest.mark.kernel("attention_backward")
@both_forms
@given(problem=attention_problems(max_t=5, max_d=3, max_b=2, max_h=2, max_blocks=5))
@settings(max_examples=10)
def test_attention_backward_matches_finite_differences(backend, form, problem):
    """Both backward forms of the backend, in float64, against central differences of sum(attention(q, k, v) * G)."""
    q, k, v, G = problem.inputs(np.float64)
    kw = problem.kw
    block = None if form == "plain" else problem.block_size
    out, lse = run_kernel(backend, "attention", q, k, v, block_size=block, **kw)
    grads = run_kernel(backend, "attention_backward", G, q, k, v, out, lse, block_size=block, **kw)

    def loss(q_, k_, v_):
        return float(np.sum(ref.attention(q_, k_, v_, **kw)[0] * G))

    numeric = (central_difference(lambda x: loss(x, k, v), q),
               central_difference(lambda x: loss(q, x, v), k),
               central_difference(lambda x: loss(q, k, x), v))
    for name, g, n in zip(("dq", "dk", "dv"), grads, numeric):
        assert_grad_close(g, n, what=f"attention_backward {name} ({form})")
