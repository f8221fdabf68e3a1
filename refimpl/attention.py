"""Multi-head self-attention (Vaswani et al. 2017, §3.2.2) on top of the backend's attention kernel.

The kernel comes in two numerically equivalent forms (refimpl/kernels/attention.py): the plain one that
materialises the (T, T) score matrix, and the tiled online-softmax one (FlashAttention, Dao et al. 2022)
that never does. `block_size=None` picks the plain form. The attention width is n_heads * d_head, which
need not equal d_model: that is what lets the Wide Attention study vary heads per layer at fixed width.
"""
from __future__ import annotations

import numpy as np

from . import functional as F
from .nn import Linear, Module


class MultiHeadAttention(Module):
    def __init__(self, d_model, n_heads, d_head, *, causal, block_size=None, rng, std=0.02, out_std=0.02,
                 dtype=np.float32):
        super().__init__()
        self.n_heads, self.d_head, self.causal, self.block_size = n_heads, d_head, causal, block_size
        inner = n_heads * d_head
        self.q_proj = Linear(d_model, inner, rng=rng, std=std, dtype=dtype)
        self.k_proj = Linear(d_model, inner, rng=rng, std=std, dtype=dtype)
        self.v_proj = Linear(d_model, inner, rng=rng, std=std, dtype=dtype)
        self.out_proj = Linear(inner, d_model, rng=rng, std=out_std, dtype=dtype)

    def _split_heads(self, x, B, T):
        x = x.reshape(B, T, self.n_heads, self.d_head)       # (B, T, H, D)
        return x.transpose(1, 2)                             # (B, H, T, D)

    def forward(self, x, key_padding_mask=None):
        B, T, _ = x.shape
        q = self._split_heads(self.q_proj(x), B, T)
        k = self._split_heads(self.k_proj(x), B, T)
        v = self._split_heads(self.v_proj(x), B, T)
        o = F.scaled_dot_product_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                           block_size=self.block_size)  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, H*D)
        return self.out_proj(o)
