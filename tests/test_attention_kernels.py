"""Tests for refimpl.kernels.attention: the plain and the FlashAttention-tiled reference kernels.

Independent checks: a naive per-row float64 implementation written here, float64 central finite
differences, exact agreement of the two forms, and (crosscheck) torch's scaled_dot_product_attention.
"""
import dataclasses
import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.kernels.attention import (
    attention, attention_backward, attention_tiled, attention_tiled_backward,
)

# Floating-point errors are bugs here: -inf - -inf (nan), log(0), x/0 must never happen inside the kernels.
def strict_fp():
    return np.errstate(invalid="raise", divide="raise", over="raise")


# ------------------------------------------------------------------------------------------ problem maker
@dataclass
class Problem:
    B: int
    H: int
    Tq: int
    Tk: int
    D: int
    causal: bool
    mask_kind: str      # "none" | "random" | "random+full" (one batch row all padding)
    scale: float | None
    seed: int

    def inputs(self, dtype=np.float64):
        """q, k, v, dout (as `dtype`) and the key padding mask (or None)."""
        rng = np.random.default_rng(self.seed)
        q = rng.standard_normal((self.B, self.H, self.Tq, self.D))
        k = rng.standard_normal((self.B, self.H, self.Tk, self.D))
        v = rng.standard_normal((self.B, self.H, self.Tk, self.D))
        dout = rng.standard_normal((self.B, self.H, self.Tq, self.D))
        mask = None
        if self.mask_kind != "none":
            mask = rng.random((self.B, self.Tk)) < 0.3
            if self.mask_kind == "random+full":
                mask[rng.integers(self.B)] = True
        return (*(a.astype(dtype) for a in (q, k, v, dout)), mask)

    @property
    def kw(self):
        return dict(causal=self.causal, scale=self.scale)


@st.composite
def problems(draw, max_b=2, max_h=3, max_t=37, max_d=16):
    return Problem(
        B=draw(st.integers(1, max_b)), H=draw(st.integers(1, max_h)),
        Tq=draw(st.integers(1, max_t)), Tk=draw(st.integers(1, max_t)), D=draw(st.integers(1, max_d)),
        causal=draw(st.booleans()),
        mask_kind=draw(st.sampled_from(["none", "random", "random+full"])),
        scale=draw(st.sampled_from([None, 0.3])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


blocks = st.integers(1, 16)


def naive_attention(q, k, v, *, causal, key_padding_mask, scale):
    """Independent float64 reference: one query row at a time, only over the keys it may see."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = np.zeros((B, H, Tq, v.shape[3]))
    lse = np.full((B, H, Tq), -np.inf)
    for b in range(B):
        for i in range(Tq):
            keys = [j for j in range(Tk)
                    if (not causal or j <= i + Tk - Tq)
                    and (key_padding_mask is None or not key_padding_mask[b, j])]
            if not keys:
                continue
            for h in range(H):
                s = np.array([scale * np.dot(q[b, h, i], k[b, h, j]) for j in keys])
                w = np.exp(s - s.max())
                lse[b, h, i] = s.max() + math.log(w.sum())
                out[b, h, i] = (w / w.sum()) @ v[b, h, keys]
    return out, lse


def close(actual, desired, rtol, atol_rel):
    """assert_allclose with atol scaled by the magnitude of `desired` (infs must match exactly)."""
    finite = desired[np.isfinite(desired)]
    magnitude = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol_rel * magnitude)


def assert_no_nan(*arrays):
    for a in arrays:
        assert not np.isnan(np.asarray(a, dtype=np.float64)).any()


# ------------------------------------------------------------------------------------------------ forward
@given(problems())
def test_plain_forward_matches_naive_float64(p):
    q, k, v, _, mask = p.inputs(np.float64)
    with strict_fp():
        out, lse = attention(q, k, v, key_padding_mask=mask, **p.kw)
    ref_out, ref_lse = naive_attention(q, k, v, key_padding_mask=mask, **p.kw)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert out.shape == (p.B, p.H, p.Tq, p.D) and lse.shape == (p.B, p.H, p.Tq)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)
    assert_no_nan(out, lse)


@given(problems())
def test_plain_forward_matches_naive_float32(p):
    q, k, v, _, mask = p.inputs(np.float32)
    with strict_fp():
        out, lse = attention(q, k, v, key_padding_mask=mask, **p.kw)
    ref_out, ref_lse = naive_attention(q, k, v, key_padding_mask=mask, **p.kw)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    close(out, ref_out, rtol=1e-5, atol_rel=1e-5)
    close(lse, ref_lse, rtol=1e-5, atol_rel=1e-5)


# ----------------------------------------------------------------------------------------- tiled == plain
def _tiled_vs_plain(p, bq, bk, dtype, rtol, atol_rel):
    q, k, v, dout, mask = p.inputs(dtype)
    with strict_fp():
        out, lse = attention(q, k, v, key_padding_mask=mask, **p.kw)
        out_t, lse_t = attention_tiled(q, k, v, key_padding_mask=mask, block_q=bq, block_k=bk, **p.kw)
        grads = attention_backward(dout, q, k, v, out, lse, key_padding_mask=mask, **p.kw)
        grads_t = attention_tiled_backward(dout, q, k, v, out, lse, key_padding_mask=mask,
                                           block_q=bq, block_k=bk, **p.kw)
    assert out_t.dtype == dtype and lse_t.dtype == dtype
    close(out_t, out, rtol, atol_rel)
    close(lse_t, lse, rtol, atol_rel)
    for g_t, g, x in zip(grads_t, grads, (q, k, v)):
        assert g_t.dtype == dtype and g_t.shape == x.shape
        close(g_t, g, rtol, atol_rel)
    assert_no_nan(out_t, lse_t, *grads_t)


@given(problems(), blocks, blocks)
def test_tiled_matches_plain_float32(p, bq, bk):
    _tiled_vs_plain(p, bq, bk, np.float32, rtol=1e-5, atol_rel=2e-6)


@given(problems(), blocks, blocks)
def test_tiled_matches_plain_float64(p, bq, bk):
    _tiled_vs_plain(p, bq, bk, np.float64, rtol=1e-12, atol_rel=1e-13)


def test_tiled_default_blocks_cover_long_sequences():
    # Tq, Tk > 64 and not multiples of it: the default block sizes with a short last block.
    p = Problem(B=1, H=2, Tq=150, Tk=130, D=8, causal=True, mask_kind="random", scale=None, seed=7)
    q, k, v, dout, mask = p.inputs(np.float64)
    out, lse = attention(q, k, v, key_padding_mask=mask, causal=True)
    out_t, lse_t = attention_tiled(q, k, v, key_padding_mask=mask, causal=True)
    np.testing.assert_allclose(out_t, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse_t, lse, rtol=1e-12, atol=1e-13)
    for g_t, g in zip(attention_tiled_backward(dout, q, k, v, out, lse, key_padding_mask=mask, causal=True),
                      attention_backward(dout, q, k, v, out, lse, key_padding_mask=mask, causal=True)):
        np.testing.assert_allclose(g_t, g, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- backward: finite diffs
def _finite_difference_grads(q, k, v, G, mask, kw, eps=1e-6):
    """Central differences of loss = sum(attention(q, k, v) * G) w.r.t. every element of q, k, v."""
    def loss(q_, k_, v_):
        return float(np.sum(naive_attention(q_, k_, v_, key_padding_mask=mask, **kw)[0] * G))
    grads = []
    for which in range(3):
        args = [q.copy(), k.copy(), v.copy()]
        x = args[which]
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            x0 = x[idx]
            x[idx] = x0 + eps
            up = loss(*args)
            x[idx] = x0 - eps
            down = loss(*args)
            x[idx] = x0
            g[idx] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


@given(problems(max_b=2, max_h=2, max_t=5, max_d=3), st.integers(1, 3), st.integers(1, 3))
@settings(max_examples=10)
def test_backward_matches_finite_differences(p, bq, bk):
    q, k, v, G, mask = p.inputs(np.float64)
    fd = _finite_difference_grads(q, k, v, G, mask, p.kw)
    with strict_fp():
        out, lse = attention(q, k, v, key_padding_mask=mask, **p.kw)
        plain = attention_backward(G, q, k, v, out, lse, key_padding_mask=mask, **p.kw)
        tiled = attention_tiled_backward(G, q, k, v, out, lse, key_padding_mask=mask,
                                         block_q=bq, block_k=bk, **p.kw)
    for name, g_fd, g, g_t in zip("qkv", fd, plain, tiled):
        np.testing.assert_allclose(g, g_fd, rtol=1e-6, atol=1e-7, err_msg=f"d{name} (plain)")
        np.testing.assert_allclose(g_t, g_fd, rtol=1e-6, atol=1e-7, err_msg=f"d{name} (tiled)")


# ------------------------------------------------------------------------------------ fully masked rows
@pytest.mark.parametrize("causal, Tq, Tk, padded_batch", [
    (False, 5, 7, 1),     # batch row 1 is all padding
    (True, 6, 6, 0),      # causal + all padding in batch row 0
    (True, 9, 4, None),   # causal with Tq > Tk: queries 0..4 see no key at all
    (True, 9, 4, 1),      # both
])
@pytest.mark.parametrize("form", ["plain", "tiled"])
def test_fully_masked_rows_give_zero_out_minus_inf_lse_zero_grads(causal, Tq, Tk, padded_batch, form):
    rng = np.random.default_rng(0)
    B, H, D = 2, 2, 4
    q = rng.standard_normal((B, H, Tq, D))
    k, v = rng.standard_normal((2, B, H, Tk, D))
    dout = rng.standard_normal((B, H, Tq, D))
    mask = np.zeros((B, Tk), dtype=bool)
    mask[:, -1] = True                                      # some ordinary padding too
    if padded_batch is not None:
        mask[padded_batch] = True
    # Which (b, i) rows see no key, worked out by hand:
    empty = np.zeros((B, Tq), dtype=bool)
    if causal:
        empty[:, :Tq - Tk] = True
    if padded_batch is not None:
        empty[padded_batch] = True
    if form == "plain":
        fwd, bwd, blk = attention, attention_backward, {}
    else:
        fwd, bwd, blk = attention_tiled, attention_tiled_backward, dict(block_q=2, block_k=3)
    with strict_fp():
        out, lse = fwd(q, k, v, causal=causal, key_padding_mask=mask, **blk)
        dq, dk, dv = bwd(dout, q, k, v, out, lse, causal=causal, key_padding_mask=mask, **blk)
    assert_no_nan(out, lse, dq, dk, dv)
    rows = np.broadcast_to(empty[:, None, :], (B, H, Tq))   # (B, H, Tq)
    assert np.all(out[rows] == 0) and np.all(lse[rows] == -np.inf)
    assert np.all(np.isfinite(lse[~rows])) and np.all(dq[rows] == 0)
    assert np.all(dk[:, :, -1] == 0) and np.all(dv[:, :, -1] == 0)  # padded keys get no gradient
    if padded_batch is not None:
        assert np.all(dk[padded_batch] == 0) and np.all(dv[padded_batch] == 0)


# ---------------------------------------------------------------------------------------- half precision
HALF = {"float16": (np.float16, 2.0**-11), "bfloat16": (ml_dtypes.bfloat16, 2.0**-8)}  # unit roundoff


@pytest.mark.parametrize("half", HALF)
@given(p=problems(max_t=20), bq=blocks, bk=blocks)
@settings(max_examples=8)
def test_half_precision_computes_in_float32_and_casts_back(half, p, bq, bk):
    dtype, u = HALF[half]
    q, k, v, dout, mask = p.inputs(np.float32)
    qh, kh, vh, douth = (a.astype(dtype) for a in (q, k, v, dout))

    def as32(*arrays):
        return [a.astype(np.float32) for a in arrays]

    for fwd, bwd, blk in [(attention, attention_backward, {}),
                          (attention_tiled, attention_tiled_backward, dict(block_q=bq, block_k=bk))]:
        with strict_fp():
            out_h, lse_h = fwd(qh, kh, vh, key_padding_mask=mask, **blk, **p.kw)
            grads_h = bwd(douth, qh, kh, vh, out_h, lse_h, key_padding_mask=mask, **blk, **p.kw)
            # The same computation on the same (rounded) values in float32: only the final cast differs.
            out_r, lse_r = fwd(*as32(qh, kh, vh), key_padding_mask=mask, **blk, **p.kw)
            grads_r = bwd(*as32(douth, qh, kh, vh, out_h), lse_h, key_padding_mask=mask, **blk, **p.kw)
            # The full-float32 pipeline from the unrounded inputs: half precision tolerance.
            out_32, _ = attention(q, k, v, key_padding_mask=mask, **p.kw)
        assert out_h.dtype == dtype and lse_h.dtype == np.float32
        assert all(g.dtype == dtype for g in grads_h)
        np.testing.assert_allclose(out_h.astype(np.float32), out_r, rtol=u, atol=1e-6)
        np.testing.assert_allclose(lse_h, lse_r, rtol=1e-6, atol=1e-6)
        for g_h, g_r in zip(grads_h, grads_r):
            np.testing.assert_allclose(g_h.astype(np.float32), g_r, rtol=u, atol=1e-6)
        close(out_h.astype(np.float32), out_32, rtol=0, atol_rel=16 * u)


# ----------------------------------------------------------------------------------------- bad input
def _good():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 1, 3, 4)), rng.standard_normal((2, 1, 5, 4)), rng.standard_normal((2, 1, 5, 4))


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v, kw: (q[0], k, v, kw), "q must be 4-D"),
    (lambda q, k, v, kw: (q, k[..., :3], v, kw), "k has shape"),
    (lambda q, k, v, kw: (q, k, v[:, :, :4], kw), "v has shape"),
    (lambda q, k, v, kw: (q.astype(np.int32), k, v, kw), "q has dtype int32"),
    (lambda q, k, v, kw: (q, k, v, dict(key_padding_mask=np.zeros((2, 4), bool))), "key_padding_mask"),
    (lambda q, k, v, kw: (q, k, v, dict(key_padding_mask=np.zeros((2, 5)))), "key_padding_mask"),
    (lambda q, k, v, kw: (q, k, v, dict(block_q=0)), "block_q must be a positive int, got 0"),
    (lambda q, k, v, kw: (q, k, v, dict(block_k=2.5)), "block_k must be a positive int, got 2.5"),
])
def test_bad_input_raises_value_error(change, match):
    q, k, v, kw = change(*_good(), {})
    with pytest.raises(ValueError, match=match):
        attention_tiled(q, k, v, **kw)
    if "block" not in match:
        with pytest.raises(ValueError, match=match):
            attention(q, k, v, **kw)


def test_backward_rejects_mismatched_out_and_lse():
    q, k, v = _good()
    out, lse = attention(q, k, v)
    with pytest.raises(ValueError, match="dout and out must have shape"):
        attention_backward(out[:, :, :2], q, k, v, out, lse)
    with pytest.raises(ValueError, match="lse must have shape"):
        attention_tiled_backward(out, q, k, v, out, lse[..., :2])


# ------------------------------------------------------------------------------------ torch crosscheck
@pytest.mark.crosscheck
@given(problems(max_t=24), st.booleans())
@settings(max_examples=10)
def test_matches_torch_sdpa_and_autograd(p, use_tiled):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    if p.causal:                                            # torch's causal is top-left aligned: equal to
        p = dataclasses.replace(p, Tk=p.Tq)                 # ours (end-aligned) only when Tq == Tk
    q, k, v, G, mask = p.inputs(np.float64)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    if mask is None:
        t_out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=p.causal, scale=p.scale)
    else:
        allowed = ~torch.tensor(mask)[:, None, None, :]     # torch's bool attn_mask: True = may attend
        if p.causal:
            allowed = allowed & torch.ones(p.Tq, p.Tk, dtype=torch.bool).tril()
        t_out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=allowed, scale=p.scale)
    (t_out * torch.tensor(G)).sum().backward()

    fwd, bwd = (attention_tiled, attention_tiled_backward) if use_tiled else (attention, attention_backward)
    blk = dict(block_q=5, block_k=3) if use_tiled else {}
    out, lse = fwd(q, k, v, key_padding_mask=mask, **blk, **p.kw)
    grads = bwd(G, q, k, v, out, lse, key_padding_mask=mask, **blk, **p.kw)

    t_out = t_out.detach().numpy()
    ok = ~np.isnan(t_out).any(axis=-1)                      # (B, H, Tq) rows torch did not turn into NaN
    np.testing.assert_allclose(out[ok], t_out[ok], rtol=1e-10, atol=1e-10)
    if ok.all():                                            # NaN rows would poison torch's gradients
        for g, t in zip(grads, (tq, tk, tv)):
            np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-9, atol=1e-10)
