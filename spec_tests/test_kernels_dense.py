"""Equivalence tests of the dense kernels (refimpl/kernels/dense.py) on every backend.

Each test runs a kernel on the backend under test (`backend` fixture, spec_tests/conftest.py) and
compares it with the NumPy reference kernel run in float64 on the same, already rounded, inputs, within
the tolerance of the backend's dtype (spec_tests/tolerances.py). On the numpy backend this checks the
reference's float32 / float16 / bfloat16 paths against its float64 path. The float64 reference itself is
checked against independent formulas written here, and every backend's backward kernels, run in float64,
against central differences of a random projection sum(forward(x) * G) of the reference forward.

Where a result cancels larger terms, the test passes `scale=` the sum of the absolute values of those
terms, the magnitude rounding errors are proportional to (tolerances.py explains).
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.kernels import dense as ref

from .strategies import (FLOAT_DTYPES, cross_entropy_problems, dtype_id, embedding_problems,
                         matmul_shapes, random_array, seeds, shapes, sizes)
from .tolerances import assert_close, assert_grad_close, central_difference, run_kernel

all_dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)


def f64(a):
    return np.asarray(a).astype(np.float64)


def assert_dtype(arr, dtype, what):
    assert np.dtype(arr.dtype) == np.dtype(dtype), f"{what}: dtype {arr.dtype}, expected {np.dtype(dtype)}"


def axis_of(ndim, pick):
    """A negative axis of an ndim array: -1 most often (pick % ndim == 0), else another one."""
    return -1 - (pick % ndim)


# ------------------------------------------------------------------------------------------------ matmul
@pytest.mark.kernel("matmul")
@all_dtypes
@given(problem=matmul_shapes(), seed=seeds)
def test_matmul(backend, dtype, problem, seed):
    a_shape, b_shape, ta, tb = problem
    rng = np.random.default_rng(seed)
    a, b = random_array(rng, a_shape, dtype), random_array(rng, b_shape, dtype)
    out = run_kernel(backend, "matmul", a, b, transpose_a=ta, transpose_b=tb)
    expected = ref.matmul(f64(a), f64(b), transpose_a=ta, transpose_b=tb)
    scale = ref.matmul(np.abs(f64(a)), np.abs(f64(b)), transpose_a=ta, transpose_b=tb)  # sum |a_ik b_kj|

    # The reference's transposes and batch broadcasting, against einsum on explicit transposes.
    a_op = f64(a).swapaxes(-1, -2) if ta else f64(a)
    b_op = f64(b).swapaxes(-1, -2) if tb else f64(b)
    assert_close(expected, np.einsum("...ik,...kj->...ij", a_op, b_op), np.float64, scale=scale,
                 what="reference matmul vs einsum")

    assert_dtype(out, dtype, "matmul")
    assert_close(out, expected, dtype, scale=scale, what="matmul")


# ----------------------------------------------------------------------------------------------- softmax
@pytest.mark.kernel("softmax")
@all_dtypes
@given(shape=shapes(max_dims=3, max_size=33), pick=st.integers(0, 5), seed=seeds, large=st.booleans())
def test_softmax(backend, dtype, shape, pick, seed, large):
    axis = axis_of(len(shape), pick)
    # large: logits around 1e4, where exp() overflows in every dtype unless the max is subtracted first.
    x = random_array(seed, shape, dtype, scale=10.0 if large else 3.0, offset=1e4 if large else 0.0)
    y = run_kernel(backend, "softmax", x, axis=axis)
    expected = ref.softmax(f64(x), axis=axis)

    # Independent float64 formula: exp(x - logsumexp(x)), logsumexp by a running logaddexp.
    x64 = f64(x)
    lse = np.logaddexp.reduce(x64, axis=axis, keepdims=True)
    assert_close(expected, np.exp(x64 - lse), np.float64, scale=expected * np.abs(x64).max(),
                 what="reference softmax vs exp(x - logsumexp)")

    assert_dtype(y, dtype, "softmax")
    assert np.isfinite(f64(y)).all(), "softmax produced inf/nan"
    assert_close(y, expected, dtype, what="softmax")
    assert_close(f64(y).sum(axis=axis), np.ones(np.delete(shape, axis % len(shape))), dtype,
                 what="softmax rows sum to 1")


@pytest.mark.kernel("softmax_backward")
@all_dtypes
@given(shape=shapes(max_dims=3, max_size=33), pick=st.integers(0, 5), seed=seeds)
def test_softmax_backward(backend, dtype, shape, pick, seed):
    axis = axis_of(len(shape), pick)
    rng = np.random.default_rng(seed)
    y = ref.softmax(random_array(rng, shape, dtype, scale=3.0), axis=axis)  # a real softmax output
    dy = random_array(rng, shape, dtype)
    dx = run_kernel(backend, "softmax_backward", dy, y, axis=axis)
    expected = ref.softmax_backward(f64(dy), f64(y), axis=axis)
    # dx = y * (dy - sum(dy * y)): the terms' magnitudes
    scale = f64(y) * (np.abs(f64(dy)) + np.abs(f64(dy) * f64(y)).sum(axis=axis, keepdims=True))
    assert_dtype(dx, dtype, "softmax_backward")
    assert_close(dx, expected, dtype, scale=scale, what="softmax_backward")


@pytest.mark.kernel("softmax_backward")
@given(shape=shapes(max_dims=2, max_size=5), pick=st.integers(0, 5), seed=seeds)
def test_softmax_backward_matches_finite_differences(backend, shape, pick, seed):
    axis = axis_of(len(shape), pick)
    rng = np.random.default_rng(seed)
    x, G = random_array(rng, shape, np.float64, scale=2.0), random_array(rng, shape, np.float64)
    numeric = central_difference(lambda x_: float(np.sum(ref.softmax(x_, axis=axis) * G)), x)
    y = run_kernel(backend, "softmax", x, axis=axis)
    assert_grad_close(run_kernel(backend, "softmax_backward", G, y, axis=axis), numeric, what="softmax_backward")


# --------------------------------------------------------------------------------------------- layernorm
def _layernorm_inputs(seed, shape, dtype, offset=0.0):
    rng = np.random.default_rng(seed)
    d = shape[-1]
    x = random_array(rng, shape, dtype, scale=2.0, offset=offset)
    weight = random_array(rng, (d,), dtype, scale=0.5, offset=1.0)
    bias = random_array(rng, (d,), dtype, scale=0.5)
    return x, weight, bias


def _check_layernorm(be, dtype, shape, seed, eps, offset=0.0):
    x, w, b = _layernorm_inputs(seed, shape, dtype, offset)
    y, mean, rstd = run_kernel(be, "layernorm", x, w, b, eps=eps)
    ey, emean, erstd = ref.layernorm(f64(x), f64(w), f64(b), eps=eps)

    # Rounding errors scale with |x|, not with the normalised values: the computed mean is off by
    # ~u|x|, which moves xhat by u|x| * rstd and var by (u|x|)^2 (the first-order term cancels because
    # sum(x - mean) = 0). With a large mean offset these are the conditioning of the problem itself.
    cdt = ref.compute_dtype(dtype)  # mean and rstd are saved for backward in the compute dtype
    u = np.finfo(cdt).eps / 2
    absx = np.abs(f64(x)).max(axis=-1, keepdims=True)                    # (..., 1)
    scale_y = absx * erstd * np.abs(f64(w)) + np.abs(f64(b))
    scale_mean = np.abs(f64(x)).mean(axis=-1, keepdims=True)
    scale_rstd = erstd * (1.0 + u * (absx * erstd) ** 2)  # relative (u|x| rstd)^2, in units of u

    # Independent float64 formula: np.var (biased, as torch) and the textbook normalisation.
    x64 = f64(x)
    var = np.var(x64, axis=-1, keepdims=True)
    ind_y = (x64 - x64.mean(axis=-1, keepdims=True)) / np.sqrt(var + eps) * f64(w) + f64(b)
    assert_close(ey, ind_y, np.float64, scale=scale_y, what="reference layernorm vs textbook")
    assert_close(erstd, 1.0 / np.sqrt(var + eps), np.float64, what="reference rstd vs textbook")

    assert_dtype(y, dtype, "layernorm y")
    assert_dtype(mean, cdt, "layernorm mean")
    assert_dtype(rstd, cdt, "layernorm rstd")
    assert mean.shape == rstd.shape == shape[:-1] + (1,)
    assert_close(y, ey, dtype, scale=scale_y, what="layernorm y")
    assert_close(mean, emean, cdt, scale=scale_mean, what="layernorm mean")
    assert_close(rstd, erstd, cdt, scale=scale_rstd, what="layernorm rstd")


@pytest.mark.kernel("layernorm")
@all_dtypes
@given(lead=shapes(min_dims=0, max_dims=2, max_size=17), d=sizes(65), seed=seeds,
       eps=st.sampled_from([1e-5, 1e-3]))
def test_layernorm(backend, dtype, lead, d, seed, eps):
    _check_layernorm(backend, dtype, lead + (d,), seed, eps)


@pytest.mark.kernel("layernorm")
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=dtype_id)
@given(lead=shapes(min_dims=1, max_dims=2, max_size=17), d=sizes(65, min_size=2), seed=seeds,
       offset=st.sampled_from([1e2, 1e3, 1e4]))
def test_layernorm_large_mean_offset(backend, dtype, lead, d, seed, offset):
    """x = offset + N(0, 2): a one-pass variance E[x^2] - E[x]^2 loses every digit here."""
    _check_layernorm(backend, dtype, lead + (d,), seed, 1e-5, offset=offset)


@pytest.mark.kernel("layernorm_backward")
@all_dtypes
@given(lead=shapes(min_dims=0, max_dims=2, max_size=17), d=sizes(65), seed=seeds)
def test_layernorm_backward(backend, dtype, lead, d, seed):
    shape = lead + (d,)
    x, w, b = _layernorm_inputs(seed, shape, dtype)
    dy = random_array([seed, 1], shape, dtype)
    _, mean, rstd = ref.layernorm(x, w, b)  # the statistics forward saves, in the compute dtype
    dx, dw, db = run_kernel(backend, "layernorm_backward", dy, x, w, mean, rstd)
    edx, edw, edb = ref.layernorm_backward(f64(dy), f64(x), f64(w), f64(mean), f64(rstd))

    # Magnitudes of the terms each result sums: dbias = sum dy, dweight = sum dy*xhat,
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight.
    lead_axes = tuple(range(len(lead)))
    xhat = (f64(x) - f64(mean)) * f64(rstd)
    g = f64(dy) * f64(w)
    scale_dx = f64(rstd) * (np.abs(g) + np.abs(g).mean(axis=-1, keepdims=True)
                            + np.abs(xhat) * np.abs(g * xhat).mean(axis=-1, keepdims=True))
    for name, out, exp, scale, dt in (
            ("dx", dx, edx, scale_dx, dtype),
            ("dweight", dw, edw, np.abs(f64(dy) * xhat).sum(axis=lead_axes), dtype),
            ("dbias", db, edb, np.abs(f64(dy)).sum(axis=lead_axes), dtype)):
        assert_dtype(out, dt, f"layernorm_backward {name}")
        assert_close(out, exp, dt, scale=scale, what=f"layernorm_backward {name}")


@pytest.mark.kernel("layernorm_backward")
@given(lead=shapes(min_dims=0, max_dims=2, max_size=3), d=sizes(5), seed=seeds)
def test_layernorm_backward_matches_finite_differences(backend, lead, d, seed):
    shape = lead + (d,)
    x, w, b = _layernorm_inputs(seed, shape, np.float64)
    G = random_array([seed, 1], shape, np.float64)
    _, mean, rstd = run_kernel(backend, "layernorm", x, w, b)
    dx, dw, db = run_kernel(backend, "layernorm_backward", G, x, w, mean, rstd)
    loss = lambda x_, w_, b_: float(np.sum(ref.layernorm(x_, w_, b_)[0] * G))  # noqa: E731
    assert_grad_close(dx, central_difference(lambda x_: loss(x_, w, b), x), what="layernorm dx")
    assert_grad_close(dw, central_difference(lambda w_: loss(x, w_, b), w), what="layernorm dweight")
    assert_grad_close(db, central_difference(lambda b_: loss(x, w, b_), b), what="layernorm dbias")


@pytest.mark.kernel("layernorm")
@pytest.mark.crosscheck
def test_layernorm_reference_matches_torch():
    torch = pytest.importorskip("torch")
    x, w, b = _layernorm_inputs(0, (4, 7, 33), np.float64, offset=3.0)
    y = ref.layernorm(x, w, b, eps=1e-5)[0]
    ty = torch.nn.functional.layer_norm(torch.from_numpy(x), (33,), torch.from_numpy(w),
                                        torch.from_numpy(b), eps=1e-5)
    assert_close(y, ty.numpy(), np.float64, what="layernorm vs torch")


# --------------------------------------------------------------------------------------------------- add
@pytest.mark.kernel("add")
@all_dtypes
@given(shape=shapes(max_dims=3, max_size=33), seed=seeds, bias=st.booleans(), wide=st.booleans())
def test_add(backend, dtype, shape, seed, bias, wide):
    """a + b, b of a's shape or a bias over its last dim. wide: sizes a multiple of 8 (the GPU's 16-byte path)."""
    if wide:
        shape = shape[:-1] + (8 * shape[-1],) if shape else (8,)
    rng = np.random.default_rng(seed)
    a = random_array(rng, shape, dtype)
    b = random_array(rng, shape[len(shape) - 1:] if bias else shape, dtype)
    y = run_kernel(backend, "add", a, b)
    expected = ref.add(a, b)
    # the reference is the exact sum, rounded (float32, then the dtype, as NumPy and ml_dtypes add 16-bit floats)
    assert_close(expected, f64(a) + f64(b), dtype, scale=np.abs(f64(a)) + np.abs(f64(b)), what="reference add")
    assert_dtype(y, dtype, "add")
    # one addition and its rounding are fully determined: every backend gives the reference's bits
    np.testing.assert_array_equal(y.view(np.uint8), np.asarray(expected).view(np.uint8))


@pytest.mark.kernel("add")
@given(seed=seeds, swap=st.booleans())
def test_add_bias_first_and_scalars(backend, seed, swap):
    """bias + x (the broadcast operand first), and an array plus a Python float, as NumPy adds them."""
    rng = np.random.default_rng(seed)
    x, bias = random_array(rng, (3, 16), np.float32), random_array(rng, (16,), np.float32)
    a, b = (bias, x) if swap else (x, bias)
    np.testing.assert_array_equal(run_kernel(backend, "add", a, b), a + b)
    np.testing.assert_array_equal(run_kernel(backend, "add", x, 0.5), x + 0.5)


# -------------------------------------------------------------------------------------------------- gelu
_C = math.sqrt(2.0 / math.pi)


@pytest.mark.kernel("gelu")
@all_dtypes
@given(shape=shapes(max_dims=3, max_size=33), seed=seeds)
def test_gelu(backend, dtype, shape, seed):
    x = random_array(seed, shape, dtype, scale=3.0)  # |x| <= 18: deep into both tails
    y = run_kernel(backend, "gelu", x)
    expected = ref.gelu(f64(x))
    x64 = f64(x)
    # gelu = 0.5 x + 0.5 x tanh(...): two terms of size 0.5|x| each
    scale = np.abs(x64)
    # Independent formula: 0.5 (1 + tanh(z)) = sigmoid(2 z), so gelu(x) = x / (1 + exp(-2 z)).
    assert_close(expected, x64 / (1.0 + np.exp(-2.0 * _C * (x64 + 0.044715 * x64 ** 3))), np.float64,
                 scale=scale, what="reference gelu vs x * sigmoid")
    assert_dtype(y, dtype, "gelu")
    assert_close(y, expected, dtype, scale=scale, what="gelu")


@pytest.mark.kernel("gelu_backward")
@all_dtypes
@given(shape=shapes(max_dims=3, max_size=33), seed=seeds)
def test_gelu_backward(backend, dtype, shape, seed):
    rng = np.random.default_rng(seed)
    x, dy = random_array(rng, shape, dtype, scale=3.0), random_array(rng, shape, dtype)
    dx = run_kernel(backend, "gelu_backward", dy, x)
    expected = ref.gelu_backward(f64(dy), f64(x))
    # gelu' = 0.5 (1 + t) + 0.5 x (1 - t^2) z', whose second term cancels (t -> +-1) in the tails
    x64 = f64(x)
    scale = np.abs(f64(dy)) * (1.0 + np.abs(x64) * _C * (1.0 + 3 * 0.044715 * x64 ** 2))
    assert_dtype(dx, dtype, "gelu_backward")
    assert_close(dx, expected, dtype, scale=scale, what="gelu_backward")


@pytest.mark.kernel("gelu_backward")
@given(shape=shapes(max_dims=2, max_size=7), seed=seeds)
def test_gelu_backward_matches_finite_differences(backend, shape, seed):
    rng = np.random.default_rng(seed)
    x, G = random_array(rng, shape, np.float64, scale=2.0), random_array(rng, shape, np.float64)
    numeric = central_difference(lambda x_: float(np.sum(ref.gelu(x_) * G)), x)
    assert_grad_close(run_kernel(backend, "gelu_backward", G, x), numeric, what="gelu_backward")


@pytest.mark.kernel("gelu")
@pytest.mark.crosscheck
def test_gelu_reference_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.linspace(-12.0, 12.0, 241)
    expected = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert_close(ref.gelu(x), expected, np.float64, scale=np.abs(x), what="gelu vs torch")


# --------------------------------------------------------------------------------------------- embedding
@pytest.mark.kernel("embedding")
@all_dtypes
@given(problem=embedding_problems())
def test_embedding(backend, dtype, problem):
    w, ids = problem.weight(dtype), problem.ids()
    out = run_kernel(backend, "embedding", w, ids)
    # A gather copies rows: exact, against an explicit loop.
    expected = np.stack([w[i] for i in ids.reshape(-1)]).reshape(ids.shape + (problem.D,))
    assert_dtype(out, dtype, "embedding")
    np.testing.assert_array_equal(f64(ref.embedding(w, ids)), f64(expected))
    np.testing.assert_array_equal(f64(out), f64(expected))


@pytest.mark.kernel("embedding_backward")
@all_dtypes
@given(problem=embedding_problems())
def test_embedding_backward(backend, dtype, problem):
    ids, dout, V, D = problem.ids(), problem.dout(dtype), problem.V, problem.D
    dw = run_kernel(backend, "embedding_backward", dout, ids, V)
    expected = ref.embedding_backward(f64(dout), ids, V)

    # Independent formula: dweight = onehot(ids)^T @ dout. Rows never read are exactly 0 (scale 0).
    onehot = (ids.reshape(-1)[:, None] == np.arange(V)[None, :]).astype(np.float64)  # (N, V)
    rows = f64(dout).reshape(-1, D)                                                  # (N, D)
    scale = onehot.T @ np.abs(rows)
    assert_close(expected, onehot.T @ rows, np.float64, scale=scale, what="reference vs one-hot matmul")
    assert_dtype(dw, dtype, "embedding_backward")
    assert dw.shape == (V, D)
    assert_close(dw, expected, dtype, scale=scale, what="embedding_backward")


@pytest.mark.kernel("embedding_backward")
@given(problem=embedding_problems(max_v=6, max_d=4))
@settings(max_examples=10)
def test_embedding_backward_matches_finite_differences(backend, problem):
    ids, w, G = problem.ids(), problem.weight(np.float64), problem.dout(np.float64)
    numeric = central_difference(lambda w_: float(np.sum(ref.embedding(w_, ids) * G)), w)
    assert_grad_close(run_kernel(backend, "embedding_backward", G, ids, problem.V), numeric,
                      what="embedding_backward")


# ----------------------------------------------------------------------------------------- cross-entropy
def _independent_cross_entropy(z, t, ignore_index):
    """float64 mean NLL over non-ignored rows (0 when none) and per-row logsumexp, by logaddexp."""
    lse = np.logaddexp.reduce(z, axis=-1)
    valid = t != ignore_index
    nll = lse[valid] - z[np.flatnonzero(valid), t[valid]]
    return (nll.mean() if valid.any() else 0.0), lse


@pytest.mark.kernel("cross_entropy")
@all_dtypes
@given(problem=cross_entropy_problems())
def test_cross_entropy(backend, dtype, problem):
    z, t, ii = problem.logits(dtype), problem.targets(), problem.ignore_index
    loss, lse = run_kernel(backend, "cross_entropy", z, t, ignore_index=ii)
    eloss, else_ = ref.cross_entropy(f64(z), t, ignore_index=ii)
    iloss, ilse = _independent_cross_entropy(f64(z), t, ii)

    # lse = max + log(sum exp(z - max)): error ~ u |z|; nll = lse - z_t cancels the two.
    z64, valid = f64(z), t != ii
    scale_lse = np.abs(z64).max(axis=-1) + 1.0
    scale_loss = (scale_lse + np.abs(z64).max(axis=-1))[valid].mean() if valid.any() else 0.0
    assert_close(else_, ilse, np.float64, scale=scale_lse, what="reference lse vs logaddexp")
    assert_close(eloss, iloss, np.float64, scale=scale_loss, what="reference loss vs logaddexp")

    cdt = ref.compute_dtype(dtype)  # loss and lse stay in the compute dtype (no low-precision rounding)
    assert_dtype(loss, cdt, "cross_entropy loss")
    assert_dtype(lse, cdt, "cross_entropy lse")
    assert loss.shape == () and lse.shape == (problem.N,)
    assert_close(loss, eloss, cdt, scale=scale_loss, what="cross_entropy loss")
    assert_close(lse, else_, cdt, scale=scale_lse, what="cross_entropy lse")


@pytest.mark.kernel("cross_entropy_backward")
@all_dtypes
@given(problem=cross_entropy_problems(), dloss_as_array=st.booleans())
def test_cross_entropy_backward(backend, dtype, problem, dloss_as_array):
    z, t, ii, dloss = problem.logits(dtype), problem.targets(), problem.ignore_index, problem.dloss()
    cdt = ref.compute_dtype(dtype)
    _, lse = run_kernel(backend, "cross_entropy", z, t, ignore_index=ii)  # what forward saves, in the compute dtype
    # autodiff hands the loss gradient over as a 0-d array of the loss dtype; a float must work too
    dl = np.asarray(dloss, dtype=cdt) if dloss_as_array else dloss
    dz = run_kernel(backend, "cross_entropy_backward", dl, z, t, lse, ignore_index=ii)
    expected = ref.cross_entropy_backward(float(dl), f64(z), t, f64(lse), ignore_index=ii)

    # Independent formula: (softmax - onehot) * dloss / count on valid rows, 0 on ignored rows.
    z64, valid = f64(z), t != ii
    count = max(int(valid.sum()), 1)
    lse64 = np.logaddexp.reduce(z64, axis=-1, keepdims=True)
    p = np.exp(z64 - lse64)
    onehot = np.zeros_like(p)
    onehot[np.flatnonzero(valid), t[valid]] = 1.0
    # p = exp(z - lse) inherits the rounding error of its exponent: u |z - lse| for the backend (same
    # z and lse), u (|z| + |lse|) for two float64 formulas that each compute lse. 0 on ignored rows.
    weight = valid[:, None] * abs(float(dl)) / count
    scale = (p * (1.0 + np.abs(z64 - f64(lse)[:, None])) + onehot) * weight
    scale_ref = (p * (1.0 + np.abs(z64) + np.abs(lse64)) + onehot) * weight
    fresh = ref.cross_entropy_backward(float(dl), z64, t, ref.cross_entropy(z64, t, ignore_index=ii)[1],
                                       ignore_index=ii)
    assert_close(fresh, (p - onehot) * valid[:, None] * float(dl) / count, np.float64, scale=scale_ref,
                 what="reference vs (softmax - onehot) / count")

    assert_dtype(dz, dtype, "cross_entropy_backward")
    assert_close(dz, expected, dtype, scale=scale, what="cross_entropy_backward")


@pytest.mark.kernel("cross_entropy", "cross_entropy_backward")
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=dtype_id)
def test_cross_entropy_all_ignored_is_zero(backend, dtype):
    """Every target ignored: loss 0 (not torch's nan) and an all-zero gradient, exactly."""
    z = random_array(0, (5, 7), dtype)
    t = np.full(5, -100)
    loss, lse = run_kernel(backend, "cross_entropy", z, t, ignore_index=-100)
    assert float(loss) == 0.0
    dz = run_kernel(backend, "cross_entropy_backward", 1.0, z, t, lse, ignore_index=-100)
    assert_dtype(dz, dtype, "cross_entropy_backward")
    assert not f64(dz).any()


@pytest.mark.kernel("cross_entropy_backward")
@given(problem=cross_entropy_problems(max_n=5, max_c=5))
def test_cross_entropy_backward_matches_finite_differences(backend, problem):
    z, t, ii, dloss = problem.logits(np.float64), problem.targets(), problem.ignore_index, problem.dloss()
    _, lse = run_kernel(backend, "cross_entropy", z, t, ignore_index=ii)
    numeric = central_difference(lambda z_: float(ref.cross_entropy(z_, t, ignore_index=ii)[0]) * dloss, z)
    assert_grad_close(run_kernel(backend, "cross_entropy_backward", dloss, z, t, lse, ignore_index=ii), numeric,
                      what="cross_entropy_backward")


@pytest.mark.kernel("cross_entropy")
@pytest.mark.crosscheck
def test_cross_entropy_reference_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((9, 11)) * 3
    t = rng.integers(0, 11, size=9)
    t[[1, 4]] = -100
    loss, _ = ref.cross_entropy(z, t, ignore_index=-100)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(z), torch.from_numpy(t), ignore_index=-100)
    assert_close(loss, expected.numpy(), np.float64, what="cross_entropy vs torch")
