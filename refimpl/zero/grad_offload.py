"""Where the reduced gradients go: the device, or host memory when the optimizer runs there (ZeRO-Offload).

ZeRO-Offload (Ren et al. 2021, §4.2): with ``offload_optimizer`` set, the optimizer step runs on the host, so
each rank's reduced gradient partition is copied to pinned host memory as it is produced: at the accumulation
boundary (stages 0-1 reduce there), or bucket by bucket during backward (stages 2-3, zero/buckets.py), on the
copy stream beside compute (refimpl/memory/transfer.py); stages 2-3 copy them straight into the host partition
(zero/buckets.py).
"""
from __future__ import annotations

import numpy as np

from ..backend import host_backend


class GradientTier:
    def __init__(self, on_host: bool, backend, copies):
        self.on_host, self.backend, self.copies = on_host, backend, copies
        # the kernels that read the gradient partition where it lives (overflow check, norm): the host's or the
        # device's (host_backend: a CPU backend's own kernels, behind a GPU backend the fastest CPU backend's)
        self.kernels = host_backend(backend) if on_host else backend

    def zeros(self, numel: int, dtype):
        """A gradient partition of zeros in its tier (on the host: pinned, so copies into it run beside compute)."""
        if not self.on_host:
            return self.backend.zeros((numel,), dtype)
        out = self.copies.host_empty(numel * np.dtype(dtype).itemsize).view(dtype)
        out[...] = 0
        return out

    def move(self, grads, label: str):
        """The reduced gradients in their tier (a copy to the host, waited for, when the optimizer is there)."""
        if not self.on_host:
            return grads
        out = self.copies.host_empty(grads.nbytes).view(grads.dtype)
        return self.copies.to_host(grads, out, label).wait()
