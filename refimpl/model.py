"""The pre-LN Transformer (GPT-2 style), as a causal byte-level LM or as a sequence classifier.

    x = tok_emb(ids) + pos_emb(positions)
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    x = ln_f(x);  LM: logits = lm_head(x)   classifier: logits = head(x[:, 0])   (position 0 is [CLS])

Width and depth are config (`n_layers`, `n_heads`, `d_model`, `d_head`, `d_ff`), so the Wide Attention
study (a fixed total number of heads spread over fewer, wider layers or more, narrower ones) is a config
change. Initialisation follows GPT-2: N(0, init_std), residual projections scaled by 1/sqrt(2 n_layers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from . import functional as F
from .activation_checkpointing import checkpoint
from .attention import MultiHeadAttention
from .nn import MLP, Embedding, LayerNorm, Linear, Module, ModuleList
from .tiling import TiledLinear
from .deferred_init import eager


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    task: str = "lm"            # "lm" (causal, next-token) or "classify" (bidirectional, [CLS] head)
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 128
    d_head: int | None = None   # None: d_model // n_heads
    d_ff: int | None = None     # None: 4 * d_model
    max_seq_len: int = 128
    n_classes: int | None = None
    attention: str = "plain"    # "plain" or "tiled"
    attention_block_size: int = 64
    layernorm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    mlp_tiles: int = 1                    # >1: the MLP's linears as TiledLinear grids of mlp_tiles x mlp_tiles
    checkpoint_activations: bool = False  # recompute each Block in backward (activation checkpointing)
    cpu_checkpointing: bool = False       # ... keeping the blocks' inputs in host memory meanwhile

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


class Block(Module):
    """One pre-LN transformer block: the unit that activation checkpointing and ZeRO-3 prefetch see."""

    def __init__(self, cfg: ModelConfig, *, rng, dtype):
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        block = cfg.attention_block_size if cfg.attention == "tiled" else None
        self.ln_1 = LayerNorm(cfg.d_model, cfg.layernorm_eps, dtype=dtype)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.head_dim, causal=cfg.task == "lm",
                                       block_size=block, rng=rng, std=cfg.init_std, out_std=out_std, dtype=dtype)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.layernorm_eps, dtype=dtype)
        self.mlp = MLP(cfg.d_model, cfg.ff_dim, rng=rng, std=cfg.init_std, out_std=out_std, dtype=dtype)
        if cfg.mlp_tiles > 1:  # memory-centric tiling (ZeRO-Infinity §5.1.3): stage 3 gathers one tile at a time
            t = cfg.mlp_tiles
            with eager():  # the tiles are cut from the drawn weight (each tile is small: that is the point)
                self.mlp.fc1 = TiledLinear.from_linear(self.mlp.fc1, in_splits=t, out_splits=t)
                self.mlp.fc2 = TiledLinear.from_linear(self.mlp.fc2, in_splits=t, out_splits=t)

    def forward(self, x, key_padding_mask=None):
        x = x + self.attn(self.ln_1(x), key_padding_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(Module):
    def __init__(self, cfg: ModelConfig, *, seed: int = 0, dtype=np.float32):
        super().__init__()
        if cfg.task not in ("lm", "classify"):
            raise ValueError(f"model.task must be 'lm' or 'classify', got {cfg.task!r}")
        if cfg.task == "classify" and not cfg.n_classes:
            raise ValueError("model.n_classes must be set for task 'classify'")
        self.cfg, self.dtype = cfg, np.dtype(dtype)
        self.checkpoint_host = None   # cpu_checkpointing's host tier: the engine sets it (refimpl/engine.py)
        rng = np.random.default_rng(seed)  # parameters are drawn in registration order: deterministic
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, rng=rng, std=cfg.init_std, dtype=dtype)
        self.pos_emb = Embedding(cfg.max_seq_len, cfg.d_model, rng=rng, std=cfg.init_std, dtype=dtype)
        self.blocks = ModuleList(Block(cfg, rng=rng, dtype=dtype) for _ in range(cfg.n_layers))
        self.ln_f = LayerNorm(cfg.d_model, cfg.layernorm_eps, dtype=dtype)
        if cfg.task == "lm":
            if not cfg.tie_embeddings:
                self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False, rng=rng, std=cfg.init_std, dtype=dtype)
        else:
            self.head = Linear(cfg.d_model, cfg.n_classes, rng=rng, std=cfg.init_std, dtype=dtype)

    def forward(self, ids, key_padding_mask=None):
        """ids (B, T) int -> logits: (B, T, vocab) for the LM, (B, n_classes) for the classifier."""
        B, T = ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        positions = np.broadcast_to(np.arange(T), (B, T))
        x = self.tok_emb(ids) + self.pos_emb(self._as_ids(positions))   # (B, T, C)
        for block in self.blocks:
            if self.cfg.checkpoint_activations:
                x = checkpoint(block, x, key_padding_mask, cpu_checkpointing=self.cfg.cpu_checkpointing,
                               host=self.checkpoint_host)
            else:
                x = block(x, key_padding_mask)
        x = self.ln_f(x)
        if self.cfg.task == "classify":
            return self.head(x[:, 0])                                   # (B, n_classes)
        if self.cfg.tie_embeddings:
            return F.linear(x, self.tok_emb.weight)                     # (B, T, vocab)
        return self.lm_head(x)

    def _as_ids(self, a):
        from .backend import get_backend
        return get_backend().asarray(np.ascontiguousarray(a))

    def loss(self, batch):
        """Mean cross-entropy of a data.Batch (next-byte targets for the LM, labels for the classifier)."""
        from .backend import get_backend
        be = get_backend()
        ids = be.asarray(batch.ids)
        kpm = None if batch.key_padding_mask is None else be.asarray(batch.key_padding_mask)
        logits = self(ids, kpm)
        if self.cfg.task == "classify":
            return F.cross_entropy(logits, be.asarray(batch.labels)), logits
        B, T, V = logits.shape
        return F.cross_entropy(logits.reshape(B * T, V), be.asarray(batch.targets).reshape(-1)), logits

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())
