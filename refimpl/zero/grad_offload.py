"""Where the reduced gradients go: the device, or host memory when the optimizer runs there (ZeRO-Offload).

ZeRO-Offload (Ren et al. 2021, §4.2): with ``offload_optimizer`` set, the optimizer step runs on the host, so
each rank's reduced gradient partition is copied to pinned host memory as it is produced: at the accumulation
boundary (stages 0-1 reduce there), or bucket by bucket during backward (stages 2-3, zero/buckets.py), on the
copy stream beside compute (refimpl/memory/transfer.py). The host buffers are charged to the host budget.
"""
from __future__ import annotations

import numpy as np

from ..backend import host_backend


class GradientTier:
    def __init__(self, on_host: bool, backend, copies):
        self.on_host, self.backend, self.copies = on_host, backend, copies
        self.budget = copies.ledger.budget
        # the kernels that read the gradient partition where it lives (overflow check, norm): the host's or the
        # device's (host_backend: a CPU backend's own kernels, behind a GPU backend the fastest CPU backend's)
        self.kernels = host_backend(backend) if on_host else backend

    def zeros(self, numel: int, dtype):
        """A gradient partition of zeros in its tier."""
        return np.zeros(numel, dtype) if self.on_host else self.backend.zeros((numel,), dtype)

    def move(self, grads, label: str):
        """The reduced gradients in their tier (a copy to the host, waited for, when the optimizer is there)."""
        if not self.on_host:
            return grads
        out = self.copies.host_empty(grads.nbytes).view(grads.dtype)
        return self.copies.to_host(grads, out, label).wait()

    def start_move(self, grads, label: str):
        """Start copying reduced gradients to a pinned host buffer on the copy stream: a HostCopy, whose buffer
        is charged to the host budget until ``landed`` gives it back."""
        self.budget.alloc("host", grads.nbytes, f"the pinned buffer of {label}")
        out = self.copies.host_empty(grads.nbytes).view(grads.dtype)
        return self.copies.to_host(grads, out, label)

    def landed(self, copy):
        """The bytes of a finished start_move (waits for it); its buffer leaves the budget."""
        out = copy.wait()
        self.budget.free("host", out.nbytes)
        return out
