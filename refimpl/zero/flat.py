"""Flat parameter buffers: every parameter of a model as a view into one contiguous array.

ZeRO partitions model states by flattening them (ZeRO paper §5; DeepSpeed's `flatten_dense_tensors_aligned`
and `round_robin`-free contiguous layout): one buffer, padded to a multiple of world_size so that each rank
owns an equal contiguous shard `buffer[rank * shard : (rank + 1) * shard]`. The optimizer then works on flat
arrays (one fused kernel over all parameters) and gradients are gathered into a flat array of the same layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in the flat buffer."""
    name: str
    shape: tuple
    offset: int
    numel: int


class FlatParams:
    """Re-home `named_params` into one flat buffer of `dtype`; each param.data becomes a view into it."""

    def __init__(self, named_params, backend, dtype=None, world_size: int = 1):
        named_params = list(named_params)
        self.backend = backend
        self.params = [p for _, p in named_params]
        self.dtype = np.dtype(dtype or self.params[0].dtype)
        self.slots, offset = [], 0
        for name, p in named_params:
            self.slots.append(Slot(name, tuple(p.shape), offset, p.size))
            offset += p.size
        self.numel = offset
        self.world_size = world_size
        self.padded_numel = -(-offset // world_size) * world_size  # round up: equal shards on every rank
        self.buffer = backend.zeros((self.padded_numel,), self.dtype)
        for slot, p in zip(self.slots, self.params):
            view = self.buffer[slot.offset:slot.offset + slot.numel]
            view[...] = p.data.reshape(-1)
            p.data = view.reshape(slot.shape)

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    def flat_grads(self, dtype=np.float32):
        """The parameters' .grad laid out like the buffer (zeros for params without grad and padding)."""
        out = self.backend.zeros((self.padded_numel,), dtype)
        for slot, p in zip(self.slots, self.params):
            if p.grad is not None:
                out[slot.offset:slot.offset + slot.numel] = p.grad.reshape(-1)
        return out

    def unflatten(self, flat) -> dict:
        """name -> view of `flat` with the parameter's shape (padding dropped)."""
        return {s.name: flat[s.offset:s.offset + s.numel].reshape(s.shape) for s in self.slots}
