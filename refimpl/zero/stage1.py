"""ZeRO stage 1, optimizer state partitioning (P_os, ZeRO §5.1).

The fp32 master weights and Adam's moments (12Ψ bytes of the 16Ψ) are cut into N partitions
(refimpl/zero/partition.py) and rank r keeps only partition r: 12Ψ/N per rank. Gradients are still whole on
every rank until the accumulation boundary; then one reduce-scatter leaves each rank the summed gradient of its
own partition (Ψ of traffic), each rank updates its partition, and an all-gather of the updated low-precision
partitions gives every rank the whole new model (Ψ): 2Ψ in all, the same volume as data parallelism (§7.2.1).
What the engine calls: zero/base.py.
"""
from __future__ import annotations

from ..deferred_init import materialize_all
from .base import ZeroStage
from .flat import FlatParams


class OptimizerStatePartitioning(ZeroStage):
    stage = 1
    partitioned = True

    def _init_states(self):
        materialize_all(self.model)   # a model built inside zero.Init(): stages 0-2 keep whole parameters
        self.flat = FlatParams(self.params.items(), self.backend, self.dtype)   # whole low-precision parameters
        full = {n: p.data for n, p in self.params.items()}
        self.master = self.layout.partition(full, self.rank, dtype=self.master_dtype)   # this rank's slice only
        self.lowp_partition = self.backend.cast(self.master, self.dtype)  # what the all-gather sends

    def after_backward(self) -> None:
        """Gradients stay whole in each parameter's .grad until the boundary."""

    def reduce_gradients(self):
        """Reduce-scatter: rows of every parameter's padded gradient, summed, row `rank` kept."""
        grads = {n: (p.grad if p.grad is not None else self.backend.zeros(p.shape, self.dtype))
                 for n, p in self.params.items()}
        rows = self.layout.to_rows(grads, dtype=self.master_dtype)  # (N, S)
        mine = self.comm.reduce_scatter(rows.reshape(-1))           # (S,) this rank's partition, summed
        mean = mine / self.master_dtype.type(self.world_size)
        return self.grads.move(mean, "reduced gradient partition")

    def apply_update(self, grad, *, lr, grad_scale) -> None:
        """AdamW on this rank's partition writes its low-precision copy; an all-gather of the copies gives every
        rank the whole new model."""
        self._step(grad, lr, grad_scale, out_lowp=self.lowp_partition)
        self._all_gather_params()

    def _all_gather_params(self) -> None:
        self.flat.assign(self.layout.unpartition(self.comm.all_gather(self.lowp_partition)))

    def zero_grads(self) -> None:
        self.model.zero_grad()

    def full_params(self) -> dict:
        return self.flat.unflatten(self.flat.buffer)

    def _load_lowp(self, lowp) -> None:
        self.lowp_partition[...] = lowp
        self._all_gather_params()

    def _param_bytes(self) -> int:
        return self.layout.numel * self.dtype.itemsize   # whole parameters on every rank

    def _grad_bytes(self) -> int:
        return self.layout.numel * self.dtype.itemsize   # whole gradients in each .grad
