"""ZeRO stage 0: plain data parallelism, the baseline every stage is measured against (ZeRO §3, §5).

Every rank holds every model state: low-precision parameters (2Ψ bytes in fp16), their gradients (2Ψ) and
the fp32 optimizer states (master weights, Adam's m and v: 12Ψ) — K = 12 in the paper's notation, 16Ψ per
rank in all. After backward the ranks all-reduce their gradients (2Ψ of traffic per rank, ring algorithm),
so every rank takes the same optimizer step on the same numbers. What the engine calls: zero/base.py.
"""
from __future__ import annotations

from ..deferred_init import materialize_all
from .base import ZeroStage
from .flat import FlatParams


class DataParallel(ZeroStage):
    stage = 0
    partitioned = False

    def _init_states(self):
        materialize_all(self.model)   # a model built inside zero.Init(): stages 0-2 keep whole parameters
        # Whole parameters in one flat buffer; with one partition the buffer *is* the partition layout.
        self.flat = FlatParams(self.params.items(), self.backend, self.dtype)
        if self.dtype == self.master_dtype:
            self.master, self.lowp_partition = self.flat.buffer, None  # fp32 (fp64): the master is the model
        else:
            self.master, self.lowp_partition = self.backend.cast(self.flat.buffer, self.master_dtype), self.flat.buffer

    def after_backward(self) -> None:
        """Gradients stay in each parameter's .grad (autodiff accumulates micro-batches there)."""

    def reduce_gradients(self):
        """All-reduce the whole gradient: every rank gets the mean over ranks (fp32)."""
        grads = self.flat.flat_grads(self.master_dtype)
        if self.world_size == 1:   # the mean over one rank is its gradient (saves two passes over it on a GPU)
            return grads
        return self.comm.all_reduce(grads) / self.master_dtype.type(self.world_size)

    def apply_update(self, grad, *, lr, grad_scale) -> None:
        """AdamW updates the master in place and writes its low-precision copy into the flat buffer the parameters
        are views of (in fp32 the master *is* that buffer): nothing to publish."""
        self._step(grad, lr, grad_scale, out_lowp=self.lowp_partition)

    def zero_grads(self) -> None:
        self.model.zero_grad()

    def full_params(self) -> dict:
        return self.flat.unflatten(self.flat.buffer)

    def _load_lowp(self, lowp) -> None:
        if self.lowp_partition is not None:   # (in fp32 the loaded master is the model already)
            self.lowp_partition[...] = lowp

    def _param_bytes(self) -> int:
        return self.layout.numel * self.dtype.itemsize   # whole parameters on every rank

    def _grad_bytes(self) -> int:
        return self.layout.numel * self.dtype.itemsize   # whole gradients in each .grad

    def _optimizer_bytes(self) -> int:
        moments = 2 * self.master_dtype.itemsize * self.layout.numel
        return moments if self.lowp_partition is None else moments + self.master_dtype.itemsize * self.layout.numel
