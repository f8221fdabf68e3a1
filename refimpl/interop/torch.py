"""The PyTorch twin of refimpl's Transformer (refimpl/model.py), for cross-checks.

The same pre-LN GPT-2-style architecture written with torch.nn (nn.Linear, nn.LayerNorm,
F.gelu(approximate="tanh"), F.scaled_dot_product_attention), with refimpl's parameter names one to one, so
``twin.load_state_dict(model.state_dict())`` needs no renaming and a strict load fails on any mismatch. It is
the independent spec of refimpl's model in tests/test_crosscheck_torch.py, the peer of
benchmarks/train_step_cpu.py and the model ``refimpl crosscheck`` hands to PyTorch and DeepSpeed.

    twin = to_torch(model)                  # refimpl weights, float32 (or dtype=torch.float64, ...)
    loss = torch_loss(twin, batch)          # a refimpl.data.Batch, the loss refimpl's Transformer.loss computes

``import torch`` happens here, so only code that asks for the twin needs PyTorch (extra ``[crosscheck]``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TorchTransformer", "to_torch", "load_weights", "torch_loss"]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h, self.d, self.causal = cfg.n_heads, cfg.head_dim, cfg.task == "lm"
        inner = cfg.n_heads * cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(cfg.d_model, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, cfg.d_model)

    def forward(self, x, key_padding_mask=None):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.h, self.d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # torch's boolean attn_mask is True where attention is allowed; refimpl's mask is True at padding
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]      # (B, 1, 1, T)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)   # (B, H, T, D)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.d_model, cfg.ff_dim), nn.Linear(cfg.ff_dim, cfg.d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_eps), Attention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_eps), MLP(cfg)

    def forward(self, x, key_padding_mask=None):
        x = x + self.attn(self.ln_1(x), key_padding_mask)
        return x + self.mlp(self.ln_2(x))


class TorchTransformer(nn.Module):
    """refimpl.model.Transformer in torch.nn (a ModelConfig says the shape; names match refimpl's)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.mlp_tiles > 1:
            raise ValueError(f"model.mlp_tiles={cfg.mlp_tiles}: the torch twin has no tiled MLP (refimpl's tiles are "
                             f"separate parameters); cross-check with model.mlp_tiles=1, which computes the same")
        self.task, self.tie = cfg.task, cfg.tie_embeddings
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layernorm_eps)
        if cfg.task == "lm":
            if not cfg.tie_embeddings:
                self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        else:
            self.head = nn.Linear(cfg.d_model, cfg.n_classes)

    def forward(self, ids, key_padding_mask=None):
        """ids (B, T) -> logits (B, T, vocab) for the LM, (B, n_classes) for the classifier ([CLS] at 0)."""
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1], device=ids.device))[None]
        for block in self.blocks:
            x = block(x, key_padding_mask)
        x = self.ln_f(x)
        if self.task == "classify":
            return self.head(x[:, 0])
        return F.linear(x, self.tok_emb.weight) if self.tie else self.lm_head(x)


def torch_loss(twin: TorchTransformer, batch, device=None, forward=None):
    """Mean cross-entropy of a refimpl.data.Batch, as refimpl's Transformer.loss computes it. ``forward``: what
    to call instead of the twin (a DeepSpeed engine wrapping it)."""
    def t(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)
    logits = (forward or twin)(t(batch.ids), t(batch.key_padding_mask))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()   # refimpl's cross-entropy computes in fp32 on 16-bit logits (as autocast would)
    if twin.task == "classify":
        return F.cross_entropy(logits, t(batch.labels))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t(batch.targets).reshape(-1))


def load_weights(twin: nn.Module, state: dict) -> nn.Module:
    """Copy name -> array weights (refimpl's state_dict, fp32 master weights, ...) into the twin, in the twin's
    dtype; strict: a name or shape that does not match is an error."""
    dtype = next(twin.parameters()).dtype
    twin.load_state_dict({n: torch.from_numpy(np.asarray(a, dtype=np.float32 if dtype != torch.float64
                                                         else np.float64)).to(dtype)
                          for n, a in state.items()}, strict=True)
    return twin


def to_torch(model, dtype=torch.float32, device=None) -> TorchTransformer:
    """The twin of a refimpl Transformer, holding its current weights (drawn now if built inside zero.Init)."""
    twin = TorchTransformer(model.cfg).to(dtype=dtype, device=device)
    return load_weights(twin, model.state_dict())
