"""Float64 finite-difference gradient checks of every differentiable op in refimpl.functional, of a
transformer Block and of whole tiny Transformer losses (LM and classifier).

Method: tests/gradcheck.py (central differences of <R, f(x)> for a random cotangent R, as
torch.autograd.gradcheck does). Shapes come from hypothesis; values from a seeded numpy generator.
A meta-test makes sure every `Function` defined in refimpl.functional has a check here, and a
precision test (five-point stencil, rtol 1e-9) makes sure float64 stays float64 inside backward.
"""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

import refimpl.functional as F
from refimpl.autodiff import Function, Tensor
from refimpl.data import Batch
from refimpl.model import Block, ModelConfig, Transformer

from gradcheck import GradcheckError, gradcheck

COVERED: set[type] = set()


def covers(*fns):
    """Mark a test as the gradient check of these Function classes (read by the meta-test)."""
    COVERED.update(fns)
    return lambda test: test


seeds = st.integers(0, 2**32 - 1)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)


def randn(rng, shape):
    return rng.standard_normal(shape)


# ------------------------------------------------------------------------------------ op cases
# Each case builds (f, inputs, options) for gradcheck; the hypothesis tests draw the shapes, the precision
# test below reuses the same builders with fixed shapes.

def case_binary(op, rng, shape_a, shape_b):
    return (lambda t: op(t[0], t[1])), [randn(rng, shape_a), randn(rng, shape_b)], {}


def case_linear(rng, lead, n_in, n_out, bias):
    inputs = [randn(rng, (*lead, n_in)), randn(rng, (n_out, n_in))] + ([randn(rng, n_out)] if bias else [])
    return (lambda t: F.linear(*t)), inputs, {}


def case_matmul(rng, shape_a, shape_b):
    return (lambda t: F.matmul(t[0], t[1])), [randn(rng, shape_a), randn(rng, shape_b)], {}


def case_layernorm(rng, lead, C, eps):
    inputs = [randn(rng, (*lead, C)), 1 + 0.5 * randn(rng, C), randn(rng, C)]
    return (lambda t: F.layer_norm(t[0], t[1], t[2], eps)), inputs, {}


def case_embedding(rng, V, D, ids_shape):
    ids = rng.integers(0, V, ids_shape)
    ids.reshape(-1)[:2] = ids.reshape(-1)[0]  # make sure at least one id repeats (when there are two slots)
    return (lambda t: F.embedding(ids, t[0])), [randn(rng, (V, D))], {}


def case_cross_entropy(rng, N, C, ignore_index, frac_ignored):
    targets = rng.integers(0, C, N)
    targets[rng.random(N) < frac_ignored] = ignore_index
    return (lambda t: F.cross_entropy(t[0], targets, ignore_index)), [3 * randn(rng, (N, C))], {}


def case_attention(rng, B, H, Tq, Tk, D, causal, padded, block_size):
    mask = None
    if padded:
        mask = rng.random((B, Tk)) < 0.3
        mask[:, -1] = False  # some key stays real (rows whose visible keys are all padding still occur)
    def f(t):
        return F.scaled_dot_product_attention(t[0], t[1], t[2], causal=causal, key_padding_mask=mask,
                                              block_size=block_size)
    return f, [randn(rng, (B, H, Tq, D)), randn(rng, (B, H, Tk, D)), randn(rng, (B, H, Tk, D))], {}


def check(case, **kw):
    f, inputs, opts = case
    gradcheck(f, inputs, **{**opts, **kw})


# ------------------------------------------------------------------------------------ elementwise
@covers(F.Add, F.Sub, F.Mul)
@given(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4),
       st.sampled_from([F.add, F.sub, F.mul]), seeds)
def test_binary_ops_with_broadcasting(shapes_, op, seed):
    a_shape, b_shape = shapes_.input_shapes
    check(case_binary(op, np.random.default_rng(seed), a_shape, b_shape))


@given(shapes, st.floats(-3, 3), seeds)
def test_operators_with_python_scalars(shape, c, seed):
    """t + c, c - t, c * t, -t, t / 2: the scalar side needs no gradient, the tensor side gets it."""
    def f(t):
        x = t[0]
        return ((x + c) * (c - x)) + (-x) * 0.5 + x / 2.0 + 2.0 * x
    gradcheck(f, [randn(np.random.default_rng(seed), shape)])


@covers(F.Scale)
@given(shapes, st.floats(-4, 4, allow_nan=False), seeds)
def test_scale(shape, c, seed):
    gradcheck(lambda t: F.scale(t[0], c), [randn(np.random.default_rng(seed), shape)])


@covers(F.Cast)
@given(shapes, seeds)
def test_cast_float64_to_float64(shape, seed):
    gradcheck(lambda t: F.mul(F.cast(t[0], np.float64), t[0]), [randn(np.random.default_rng(seed), shape)])


def test_cast_gradient_comes_back_in_the_input_dtype():
    x = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    y = F.cast(x, np.float16)
    assert y.dtype == np.float16
    y.backward(np.full((2, 3), 0.5, np.float16))
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 0.5, np.float32))


# ------------------------------------------------------------------------------------------ shapes
@covers(F.Reshape)
@given(shapes, st.sampled_from(["flat", "reversed", "split"]), seeds)
def test_reshape(shape, how, seed):
    size = int(np.prod(shape))
    target = {"flat": (size,), "reversed": shape[::-1], "split": (1, size, 1)}[how]
    gradcheck(lambda t: F.mul(t[0].reshape(target), t[0].reshape(target)),  # used twice: grads add up
              [randn(np.random.default_rng(seed), shape)])


@covers(F.Transpose)
@given(hnp.array_shapes(min_dims=2, max_dims=4, max_side=4), st.data(), seeds)
def test_transpose(shape, data, seed):
    a0 = data.draw(st.integers(-len(shape), len(shape) - 1))
    a1 = data.draw(st.integers(-len(shape), len(shape) - 1))
    gradcheck(lambda t: F.transpose(t[0], a0, a1), [randn(np.random.default_rng(seed), shape)])


@st.composite
def basic_index(draw):
    """A shape and a basic-indexing key (ints and slices, possibly negative/stepped) on its leading dims."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    key = []
    for size in shape[:draw(st.integers(1, len(shape)))]:
        if draw(st.booleans()):
            key.append(draw(st.integers(-size, size - 1)))
        else:
            bound = st.none() | st.integers(-size - 1, size + 1)
            key.append(slice(draw(bound), draw(bound), draw(st.sampled_from([None, 1, 2, -1, -2]))))
    return shape, tuple(key)


@covers(F.Index)
@given(basic_index(), seeds)
def test_index(shape_key, seed):
    shape, key = shape_key
    assume(np.empty(shape)[key].size > 0)
    gradcheck(lambda t: t[0][key], [randn(np.random.default_rng(seed), shape)])


def test_index_with_ellipsis_and_two_reads_of_one_tensor():
    x = randn(np.random.default_rng(0), (3, 4, 2))
    gradcheck(lambda t: F.mul(t[0][..., 1], t[0][:, ::-1][:, :, 0]), [x])  # (3, 4) * (3, 4)


@covers(F.Sum)
@given(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), st.data(), st.booleans(), seeds)
def test_sum(shape, data, keepdims, seed):
    n = len(shape)
    axis = data.draw(st.none() | st.integers(-n, n - 1)
                     | st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True).map(tuple))
    gradcheck(lambda t: F.sum(t[0], axis, keepdims), [randn(np.random.default_rng(seed), shape)])


def test_mean_is_sum_over_size():
    gradcheck(lambda t: F.mean(t[0]), [randn(np.random.default_rng(1), (3, 5))])


# ----------------------------------------------------------------------------------------- kernels
@covers(F.Linear)
@given(st.lists(st.integers(1, 3), max_size=2), st.integers(1, 5), st.integers(1, 5), st.booleans(), seeds)
def test_linear(lead, n_in, n_out, bias, seed):
    check(case_linear(np.random.default_rng(seed), tuple(lead), n_in, n_out, bias))


def test_linear_bias_gradient_is_the_float64_sum_of_output_gradients():
    """db = sum over rows of dy, in the dtype of the computation: a float64 model must not round it
    through float32 (that is 1e-8 relative noise, which the float64 gradient checks above then see)."""
    r = np.random.default_rng(0)
    x, w, b = (Tensor(r.standard_normal(s), requires_grad=True) for s in ((5, 4), (3, 4), (3,)))
    dy = r.standard_normal((5, 3)) / 3
    F.linear(x, w, b).backward(dy)
    assert b.grad.dtype == np.float64
    np.testing.assert_allclose(b.grad, dy.sum(axis=0), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(w.grad, dy.T @ x.data, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(x.grad, dy @ w.data, rtol=1e-14, atol=1e-15)


@covers(F.MatMul)
@given(hnp.mutually_broadcastable_shapes(signature="(m,n),(n,p)->(m,p)", max_dims=4, max_side=4), seeds)
def test_matmul_batched_and_broadcast(shapes_, seed):
    check(case_matmul(np.random.default_rng(seed), *shapes_.input_shapes))


@covers(F.Softmax)
@given(shapes, st.data(), seeds)
def test_softmax(shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    gradcheck(lambda t: F.softmax(t[0], axis), [2 * randn(np.random.default_rng(seed), shape)])


@covers(F.LayerNorm)
@given(st.lists(st.integers(1, 3), max_size=2), st.integers(2, 6), st.sampled_from([1e-5, 0.1]), seeds)
def test_layer_norm(lead, C, eps, seed):
    check(case_layernorm(np.random.default_rng(seed), tuple(lead), C, eps))


@covers(F.GELU)
@given(shapes, seeds)
def test_gelu(shape, seed):
    gradcheck(lambda t: F.gelu(t[0]), [2 * randn(np.random.default_rng(seed), shape)])


@covers(F.Embedding)
@given(st.integers(1, 6), st.integers(1, 4), hnp.array_shapes(min_dims=1, max_dims=2, max_side=5), seeds)
def test_embedding_weight_grad_with_repeated_ids(V, D, ids_shape, seed):
    check(case_embedding(np.random.default_rng(seed), V, D, ids_shape))


def test_embedding_repeated_id_gets_the_sum_of_its_rows_gradients():
    w = Tensor(np.zeros((4, 2)), requires_grad=True)
    F.embedding(np.array([[1, 3, 1], [1, 0, 0]]), w).backward(np.arange(12.0).reshape(2, 3, 2))
    np.testing.assert_array_equal(w.grad, [[8 + 10, 9 + 11], [0 + 4 + 6, 1 + 5 + 7], [0, 0], [2, 3]])


@covers(F.CrossEntropy)
@given(st.integers(1, 6), st.integers(2, 5), st.sampled_from([-100, 0, 3]), st.sampled_from([0.0, 0.4]),
       seeds)
def test_cross_entropy_with_ignore_index(N, C, ignore_index, frac_ignored, seed):
    check(case_cross_entropy(np.random.default_rng(seed), N, C, ignore_index, frac_ignored))


def test_cross_entropy_value_and_all_ignored():
    logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]])
    targets = np.array([1, -100, 0])
    lse = np.log(np.exp(logits).sum(axis=1))
    expected = ((lse[0] - 2.0) + (lse[2] - 2.0)) / 2  # mean over the two rows not ignored
    assert F.cross_entropy(Tensor(logits), targets).item() == pytest.approx(expected, rel=1e-14)
    x = Tensor(logits, requires_grad=True)
    loss = F.cross_entropy(x, np.full(3, -100))
    loss.backward()
    assert loss.item() == 0.0 and not np.any(x.grad)


@covers(F.Attention)
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 9), st.data(), st.integers(1, 3),
       st.booleans(), st.booleans(), st.sampled_from([None, 1, 2, 3, 4, 5]), seeds)
def test_attention_plain_and_tiled(B, H, Tq, data, D, causal, padded, block_size, seed):
    Tk = data.draw(st.sampled_from([Tq, max(1, Tq - 2), Tq + 3]))
    check(case_attention(np.random.default_rng(seed), B, H, Tq, Tk, D, causal, padded, block_size),
          max_entries=30)


# ------------------------------------------------------------------------- precision (float64 stays)
PRECISION_CASES = {
    "add": lambda r: case_binary(F.add, r, (3, 4), (4,)),
    "sub": lambda r: case_binary(F.sub, r, (3, 1), (2, 1, 4)),
    "mul": lambda r: case_binary(F.mul, r, (2, 3, 4), (3, 1)),
    "linear": lambda r: case_linear(r, (2, 3), 4, 3, False),
    "linear+bias": lambda r: case_linear(r, (2, 3), 4, 3, True),
    "matmul": lambda r: case_matmul(r, (2, 1, 3, 4), (3, 4, 2)),
    "softmax": lambda r: ((lambda t: F.softmax(t[0], 1)), [randn(r, (2, 5, 3))], {}),
    "layernorm": lambda r: case_layernorm(r, (2, 3), 5, 1e-5),
    "gelu": lambda r: ((lambda t: F.gelu(t[0])), [2 * randn(r, (3, 4))], {}),
    "embedding": lambda r: case_embedding(r, 5, 3, (2, 4)),
    "cross_entropy": lambda r: case_cross_entropy(r, 6, 4, -100, 0.3),
    "attention": lambda r: case_attention(r, 2, 2, 5, 5, 3, True, True, None),
    "attention_tiled": lambda r: case_attention(r, 2, 2, 7, 7, 3, False, True, 3),
}


@pytest.mark.parametrize("name", sorted(PRECISION_CASES))
def test_float64_gradients_have_float64_precision(name):
    """A five-point stencil is accurate to ~1e-11, so rtol=1e-9 fails any backward that rounds a float64
    gradient through float32 (~1e-8 relative) somewhere; the eps=1e-6 checks above are too loose for that."""
    check(PRECISION_CASES[name](np.random.default_rng(7)), order=4, eps=1e-3, rtol=1e-9, atol=1e-11)


def test_gradcheck_catches_a_wrong_gradient():
    """The checker itself must be able to fail: a Function with a deliberately wrong backward."""
    class WrongSquare(Function):
        def forward(self, x):
            self.x = x
            return x * x

        def backward(self, g):
            return 2.001 * g * self.x

    with pytest.raises(GradcheckError, match="differ"):
        gradcheck(lambda t: WrongSquare.apply(t[0]), [np.array([0.5, -1.5, 2.0])])


# ------------------------------------------------------------------------------- whole models
def tiny_config(**kw):
    base = dict(vocab_size=7, n_layers=2, n_heads=2, d_model=6, d_head=4, d_ff=10, max_seq_len=8,
                attention_block_size=3)
    return ModelConfig(**{**base, **kw})


def randomize(module, rng):
    """Scatter the parameters well away from their init (LN at 1/0, tiny weights) so that every term of
    every gradient is exercised."""
    for name, p in module.named_parameters():
        base = 1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight" else 0.0
        p.data[...] = base + 0.5 * rng.standard_normal(p.shape)


@pytest.mark.parametrize("task,attention", [("lm", "plain"), ("lm", "tiled"), ("classify", "plain"),
                                            ("classify", "tiled")])
def test_block(task, attention):
    rng = np.random.default_rng(3)
    cfg = tiny_config(task=task, attention=attention, n_classes=3)
    block = Block(cfg, rng=np.random.default_rng(0), dtype=np.float64)
    randomize(block, rng)
    B, T = 2, 5
    kpm = None
    if task == "classify":
        kpm = np.zeros((B, T), bool)
        kpm[0, 3:] = True  # a padded tail in one row
    x = rng.standard_normal((B, T, cfg.d_model))
    params = block.parameters()
    # The key-projection bias has an exactly zero gradient (softmax ignores a per-row shift of the
    # scores): the check then compares rounding noise with gradcheck's noise floor.
    gradcheck(lambda t: block(t[0], kpm), [x] + params, max_entries=30)


def lm_batch(rng, B, T, V):
    ids = rng.integers(0, V, (B, T + 1))
    return Batch(ids=ids[:, :-1], targets=ids[:, 1:], labels=None, key_padding_mask=None)


def classify_batch(rng, B, T, V, n_classes):
    ids = rng.integers(1, V, (B, T))
    kpm = np.zeros((B, T), bool)
    kpm[0, T - 2:] = True
    ids[kpm] = 0
    return Batch(ids=ids, targets=None, labels=rng.integers(0, n_classes, B), key_padding_mask=kpm)


@pytest.mark.parametrize("task,tie,attention", [("lm", False, "plain"), ("lm", True, "tiled"),
                                                 ("classify", False, "tiled")])
def test_transformer_loss(task, tie, attention):
    rng = np.random.default_rng(5)
    cfg = tiny_config(task=task, tie_embeddings=tie, attention=attention, n_classes=3)
    model = Transformer(cfg, seed=1, dtype=np.float64)
    randomize(model, rng)
    batch = lm_batch(rng, 2, 6, cfg.vocab_size) if task == "lm" else classify_batch(rng, 3, 6, cfg.vocab_size, 3)
    params = model.parameters()
    gradcheck(lambda t: model.loss(batch)[0], params, max_entries=8, seed=2)


# ------------------------------------------------------------------------------------ meta-test
def test_every_function_in_functional_has_a_gradcheck():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    defined = {c for c in subclasses(Function) if c.__module__ == F.__name__}
    assert defined, "found no Function subclasses in refimpl.functional"
    missing = sorted(c.__name__ for c in defined - COVERED)
    assert not missing, f"Functions without a gradient check in {__name__}: {missing}"
