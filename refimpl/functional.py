"""Differentiable operations: each a `Function` with forward and backward side by side.

Every forward/backward calls a kernel of the current backend (refimpl/backend.py) or plain `xp` array
code; no op branches on which backend it runs. Shapes in comments: B batch, T sequence, H heads,
D head dim, C channels / model width.
"""
from __future__ import annotations

import numpy as np

from .autodiff import Function, Tensor


def _unbroadcast(grad, shape):
    """Sum `grad` down to `shape`, undoing numpy broadcasting (leading dims added, size-1 dims stretched)."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


def _shape(x):
    return x.shape if hasattr(x, "shape") else ()


# --------------------------------------------------------------------------------------- elementwise
class Add(Function):
    def forward(self, a, b):
        self.shapes = _shape(a), _shape(b)
        return self.backend.add(a, b)

    def backward(self, g):
        return _unbroadcast(g, self.shapes[0]), _unbroadcast(g, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = _shape(a), _shape(b)
        return a - b

    def backward(self, g):
        return _unbroadcast(g, self.shapes[0]), _unbroadcast(-g, self.shapes[1])


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        ga = _unbroadcast(g * self.b, _shape(self.a)) if self.needs_input_grad[0] else None
        gb = _unbroadcast(g * self.a, _shape(self.b)) if self.needs_input_grad[1] else None
        return ga, gb


class Scale(Function):
    """x * c for a Python scalar c (loss scaling, 1/N averaging)."""

    def forward(self, x, c):
        self.c = c
        return (x * c).astype(x.dtype, copy=False)

    def backward(self, g):
        return (g * self.c).astype(g.dtype, copy=False), None


class Cast(Function):
    """Change dtype; the gradient goes back in the input's dtype."""

    def forward(self, x, dtype):
        self.in_dtype = x.dtype
        return self.backend.cast(x, dtype)

    def backward(self, g):
        return self.backend.cast(g, self.in_dtype), None


# ------------------------------------------------------------------------------------------- shapes
class Reshape(Function):
    def forward(self, x, shape):
        self.in_shape = x.shape
        return x.reshape(shape)

    def backward(self, g):
        return g.reshape(self.in_shape), None


class Transpose(Function):
    """Swap two axes (a view on numpy; backward swaps them back)."""

    def forward(self, x, axis0, axis1):
        self.axes = axis0, axis1
        return x.swapaxes(axis0, axis1)

    def backward(self, g):
        return g.swapaxes(*self.axes), None, None


class Index(Function):
    """x[key] for basic indexing (ints, slices); backward scatters into zeros."""

    def forward(self, x, key):
        self.in_shape, self.in_dtype, self.key = x.shape, x.dtype, key
        return x[key]

    def backward(self, g):
        dx = self.backend.zeros(self.in_shape, self.in_dtype)
        dx[self.key] = g
        return dx, None


class Sum(Function):
    def forward(self, x, axis=None, keepdims=False):
        self.in_shape, self.axis, self.keepdims = x.shape, axis, keepdims
        return x.sum(axis=axis, keepdims=keepdims)

    def backward(self, g):
        if self.axis is not None and not self.keepdims:
            g = self.backend.xp.expand_dims(g, self.axis)
        xp = self.backend.xp
        return xp.ascontiguousarray(xp.broadcast_to(g, self.in_shape)), None, None  # writable, not a view


# ------------------------------------------------------------------------------------------ kernels
class Linear(Function):
    """y = x @ W^T + b, W (out, in) as torch.nn.Linear stores it. x (..., in) -> y (..., out)."""

    def forward(self, x, weight, bias=None):
        self.x, self.has_bias = x, bias is not None  # the weight is re-read in backward (see Function.input_data)
        y = self.backend.matmul(x, weight, transpose_b=True)
        return y if bias is None else self.backend.add(y, bias)

    def backward(self, g):
        be = self.backend
        weight = self.input_data(1)
        dx = be.matmul(g, weight) if self.needs_input_grad[0] else None
        x2 = self.x.reshape(-1, self.x.shape[-1])                       # (N, in)
        g2 = g.reshape(-1, g.shape[-1])                                 # (N, out)
        dw = be.matmul(g2, x2, transpose_a=True).astype(weight.dtype, copy=False)  # (out, in)
        # db = 1^T g as a GEMM: it sums in fp32 (at least) and rounds once, without an fp32 copy of g
        db = be.matmul(_ones_row(be, g2.shape[0], g2.dtype), g2).reshape(-1) if self.has_bias else None
        return dx, dw, db


_ONES = {}


def _ones_row(be, n, dtype):
    """A (1, n) row of ones on the backend's device, made once per length and dtype."""
    key = (be.name, n, np.dtype(dtype).name)
    if key not in _ONES:
        _ONES[key] = be.asarray(np.ones((1, n), dtype=dtype))
    return _ONES[key]


class MatMul(Function):
    """Batched a @ b (attention scores in the readable path, tests)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return self.backend.matmul(a, b)

    def backward(self, g):
        be = self.backend
        ga = _unbroadcast(be.matmul(g, self.b, transpose_b=True), self.a.shape)
        gb = _unbroadcast(be.matmul(self.a, g, transpose_a=True), self.b.shape)
        return ga, gb


class Softmax(Function):
    def forward(self, x, axis=-1):
        self.axis = axis
        self.y = self.backend.softmax(x, axis=axis)
        return self.y

    def backward(self, g):
        return self.backend.softmax_backward(g, self.y, axis=self.axis), None


class LayerNorm(Function):
    def forward(self, x, weight, bias, eps=1e-5):
        y, self.mean, self.rstd = self.backend.layernorm(x, weight, bias, eps)
        self.x = x
        return y

    def backward(self, g):
        dx, dw, db = self.backend.layernorm_backward(g, self.x, self.input_data(1), self.mean, self.rstd)
        return dx, dw, db, None


class GELU(Function):
    def forward(self, x):
        self.x = x
        return self.backend.gelu(x)

    def backward(self, g):
        return self.backend.gelu_backward(g, self.x)


class Embedding(Function):
    def forward(self, weight, ids):
        self.ids, self.num_embeddings = ids, weight.shape[0]
        return self.backend.embedding(weight, ids)

    def backward(self, g):
        return self.backend.embedding_backward(g, self.ids, self.num_embeddings), None


class CrossEntropy(Function):
    """Mean NLL over rows with target != ignore_index. logits (N, C), targets (N,) -> scalar (float32/64)."""

    def forward(self, logits, targets, ignore_index=-100):
        self.logits, self.targets, self.ignore_index = logits, targets, ignore_index
        loss, self.lse = self.backend.cross_entropy(logits, targets, ignore_index)
        return loss

    def backward(self, g):
        return (self.backend.cross_entropy_backward(g, self.logits, self.targets, self.lse, self.ignore_index),
                None, None)


class Attention(Function):
    """softmax(scale * Q K^T + mask) V over (B, H, T, D); saves the log-sum-exp for backward."""

    def forward(self, q, k, v, causal=False, key_padding_mask=None, block_size=None):
        self.q, self.k, self.v = q, k, v
        self.opts = dict(causal=causal, key_padding_mask=key_padding_mask, block_size=block_size)
        self.out, self.lse = self.backend.attention(q, k, v, **self.opts)
        return self.out

    def backward(self, g):
        dq, dk, dv = self.backend.attention_backward(g, self.q, self.k, self.v, self.out, self.lse, **self.opts)
        return dq, dk, dv, None, None, None


# --------------------------------------------------------------------------------- function spelling
def add(a, b): return Add.apply(a, b)
def sub(a, b): return Sub.apply(a, b)
def mul(a, b): return Mul.apply(a, b)
def scale(x, c: float): return Scale.apply(x, c)
def cast(x, dtype): return Cast.apply(x, dtype)
def reshape(x, shape): return Reshape.apply(x, tuple(shape))
def transpose(x, axis0, axis1): return Transpose.apply(x, axis0, axis1)
def sum(x, axis=None, keepdims=False): return Sum.apply(x, axis, keepdims)  # noqa: A001
def mean(x): return Scale.apply(Sum.apply(x), 1.0 / x.size)
def linear(x, weight, bias=None): return Linear.apply(x, weight, bias)
def matmul(a, b): return MatMul.apply(a, b)
def softmax(x, axis=-1): return Softmax.apply(x, axis)
def layer_norm(x, weight, bias, eps=1e-5): return LayerNorm.apply(x, weight, bias, eps)
def gelu(x): return GELU.apply(x)
def embedding(ids, weight): return Embedding.apply(weight, ids)
def cross_entropy(logits, targets, ignore_index=-100): return CrossEntropy.apply(logits, targets, ignore_index)


def scaled_dot_product_attention(q, k, v, *, causal=False, key_padding_mask=None, block_size=None):
    """q, k, v (B, H, T, D). key_padding_mask (B, Tk) bool, True = ignore. block_size: None for the plain
    form, an int for the tiled (FlashAttention) form; both give the same numbers."""
    return Attention.apply(q, k, v, causal, key_padding_mask, block_size)


# Tensor operators, spelled as NumPy/PyTorch users expect.
Tensor.__add__ = Tensor.__radd__ = lambda a, b: Add.apply(a, b)
Tensor.__sub__ = lambda a, b: Sub.apply(a, b)
Tensor.__rsub__ = lambda a, b: Sub.apply(b, a)
Tensor.__mul__ = Tensor.__rmul__ = lambda a, b: Scale.apply(a, b) if isinstance(b, (int, float)) else Mul.apply(a, b)
Tensor.__neg__ = lambda a: Scale.apply(a, -1.0)
Tensor.__truediv__ = lambda a, c: Scale.apply(a, 1.0 / c)
Tensor.__matmul__ = lambda a, b: MatMul.apply(a, b)
Tensor.__getitem__ = lambda a, key: Index.apply(a, key)
Tensor.reshape = lambda a, *shape: reshape(a, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
Tensor.transpose = transpose
Tensor.sum = sum
Tensor.mean = mean
