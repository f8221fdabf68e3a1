"""ZeRO stage 1, optimizer state partitioning (P_os, ZeRO §5.1).

The fp32 master weights and Adam's moments (12Ψ bytes of the 16Ψ) are cut into N partitions
(refimpl/zero/partition.py) and rank r keeps only partition r: 12Ψ/N per rank. Gradients are still whole on
every rank until the accumulation boundary; then one reduce-scatter leaves each rank the summed gradient of its
own partition (Ψ of traffic), each rank updates its partition, and an all-gather of the updated low-precision
partitions gives every rank the whole new model (Ψ): 2Ψ in all, the same volume as data parallelism (§7.2.1).
"""
from __future__ import annotations


from .stage0 import DataParallel


class OptimizerStatePartitioning(DataParallel):
    stage = 1
    partitioned = True

    @property
    def num_partitions(self) -> int:
        return self.world_size

    def _init_params_and_master(self):
        super()._init_params_and_master()  # whole low-precision parameters, as in stage 0
        full = {n: p.data for n, p in self.params.items()}
        self.master = self.layout.partition(full, self.rank, dtype=self.master_dtype)
        self.lowp_partition = self.backend.cast(self.master, self.dtype)  # what the all-gather sends

    def reduce_gradients(self):
        """Reduce-scatter: rows of every parameter's padded gradient, summed, row `rank` kept."""
        grads = {n: (p.grad if p.grad is not None else self.backend.zeros(p.shape, self.dtype))
                 for n, p in self.params.items()}
        rows = self.layout.to_rows(grads, dtype=self.master_dtype)  # (N, S)
        mine = self.comm.reduce_scatter(rows.reshape(-1))           # (S,) this rank's partition, summed
        mean = mine / self.master_dtype.type(self.world_size)
        return self._to_grad_tier(mean, "reduced gradient partition")

    def publish_params(self, updated=None) -> None:
        """All-gather the updated low-precision partitions and write the whole parameters back."""
        gathered = self.comm.all_gather(self.lowp_partition)       # (N * S,)
        views = self.flat.unflatten(self.flat.buffer)
        for name, full in self.layout.unpartition(gathered).items():
            views[name][...] = full
