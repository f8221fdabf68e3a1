"""Flat parameter buffers: every parameter of a model as a view into one contiguous array.

Stages 0-2 keep whole low-precision parameters on every rank; refimpl keeps them in one flat buffer (DeepSpeed's
`bit16_groups_flat`) so the fp32 master can alias it when training in fp32, gradients can be laid out alike,
and a whole model's parameters are one array to write back or checksum.
"""
from __future__ import annotations

import numpy as np


class FlatParams:
    """Re-home `named_params` into one flat buffer of `dtype`; each param.data becomes a view into it."""

    def __init__(self, named_params, backend, dtype=None):
        named_params = list(named_params)
        self.backend = backend
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.dtype = np.dtype(dtype or self.params[0].dtype)
        self.offsets, offset = [], 0
        for p in self.params:
            self.offsets.append(offset)
            offset += p.size
        self.numel = offset
        self.buffer = backend.zeros((self.numel,), self.dtype)
        for off, p in zip(self.offsets, self.params):
            view = self.buffer[off:off + p.size]
            view[...] = p.data.reshape(-1)
            p.data = view.reshape(p.shape)

    def flat_grads(self, dtype=np.float32):
        """The parameters' .grad laid out like the buffer (zeros for params without a gradient)."""
        out = self.backend.zeros((self.numel,), dtype)
        for off, p in zip(self.offsets, self.params):
            if p.grad is not None:
                out[off:off + p.size] = p.grad.reshape(-1)
        return out

    def unflatten(self, flat) -> dict:
        """name -> view of `flat` with the parameter's shape."""
        return {n: flat[o:o + p.size].reshape(p.shape) for n, o, p in zip(self.names, self.offsets, self.params)}

    def assign(self, arrays: dict) -> None:
        """Write whole parameters (name -> array) into the buffer (after an all-gather of the partitions)."""
        views = self.unflatten(self.buffer)
        for name, full in arrays.items():
            views[name][...] = full
