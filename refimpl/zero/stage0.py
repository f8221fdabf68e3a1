"""ZeRO stage 0: plain data parallelism, the baseline every stage is measured against (ZeRO §3, §5).

Every rank holds every model state: low-precision parameters (2Ψ bytes in fp16), their gradients (2Ψ) and
the fp32 optimizer states (master weights, Adam's m and v: 12Ψ) — K = 12 in the paper's notation, 16Ψ per
rank in all. After backward the ranks all-reduce their gradients (2Ψ of traffic per rank, ring algorithm),
so every rank takes the same optimizer step on the same numbers.

The stage classes share one shape, which the engine (refimpl/engine.py) drives:
    after_backward()        once per micro-batch, after loss.backward()
    reduce_gradients()      at the accumulation boundary: this rank's gradient partition, mean over ranks
    master / lowp_partition what AdamW updates, and where it writes the low-precision copy
    master_pieces()         the master partition in pieces, for an optimizer whose states live off the device
    publish_params()        after the update: make the new parameters visible to the model
    zero_grads(), model_state_bytes(), full_state()/load_full_state() for checkpoints
"""
from __future__ import annotations

import numpy as np

from .flat import FlatParams
from ..deferred_init import materialize_all
from .partition import PartitionLayout


class DataParallel:
    stage = 0
    partitioned = False  # does each rank own only a slice of the optimizer state?

    def __init__(self, model, config: dict, backend, comm, dtype, ledger=None, progress: bool = False):
        from ..memory.ledger import Ledger
        from ..memory.transfer import CopyStream
        self.model, self.config, self.backend, self.comm = model, config, backend, comm
        self.ledger = ledger if ledger is not None else Ledger(comm.rank)  # tier traffic is recorded here
        self.copies = CopyStream(backend, self.ledger)   # host <-> device copies beside compute (GPU backends)
        self.dtype = np.dtype(dtype)
        self.progress = progress   # a bar while stage 3 draws and partitions a large model
        # the fp32 master, gradient reductions and Adam moments; all float64 in the fp64 reference run
        self.master_dtype = np.dtype(np.float64 if self.dtype == np.float64 else np.float32)
        self.rank, self.world_size = comm.rank, comm.world_size
        named = list(model.named_parameters())
        self.layout = PartitionLayout([(n, p.shape) for n, p in named], self.num_partitions)
        self.params = {n: p for n, p in named}
        # ZeRO-Offload: with the optimizer off the device, reduced gradients go to the host as they are produced
        off = config["zero_optimization"]["offload_optimizer"]
        self.grads_on_host = off is not None and off["device"] != "none"
        self._init_params_and_master()

    @property
    def num_partitions(self) -> int:
        return 1

    def _init_params_and_master(self):
        materialize_all(self.model)   # a model built inside zero.Init(): stages 0-2 keep whole parameters
        # Whole parameters in one flat buffer; with one partition the buffer *is* the partition layout.
        self.flat = FlatParams(self.params.items(), self.backend, self.dtype)
        if self.dtype == self.master_dtype:
            self.master, self.lowp_partition = self.flat.buffer, None  # fp32 (fp64): the master is the model
        else:
            self.master, self.lowp_partition = self.backend.cast(self.flat.buffer, self.master_dtype), self.flat.buffer

    def master_pieces(self):
        """This rank's fp32 master partition, in pieces in partition order (stage 3 yields one per parameter)."""
        yield self.master

    # -------------------------------------------------------------------------------------- backward
    def after_backward(self) -> None:
        """Gradients stay in each parameter's .grad (autodiff accumulates micro-batches there)."""

    def _to_grad_tier(self, grads, label: str):
        """Reduced gradients, moved to the host when the optimizer runs there (ZeRO-Offload)."""
        if not self.grads_on_host:
            return grads
        out = self.copies.host_empty(grads.nbytes).view(grads.dtype)
        return self.copies.to_host(grads, out, label).wait()

    def _grad_partition_buffer(self, numel: int):
        return np.zeros(numel, self.dtype) if self.grads_on_host else self.backend.zeros((numel,), self.dtype)

    def reduce_gradients(self):
        """All-reduce the whole gradient: every rank gets the mean over ranks (fp32)."""
        grads = self.flat.flat_grads(self.master_dtype)
        if self.world_size == 1:   # the mean over one rank is its gradient (saves two passes over it on a GPU)
            return grads
        return self.comm.all_reduce(grads) / self.master_dtype.type(self.world_size)

    def zero_grads(self) -> None:
        self.model.zero_grad()

    # ---------------------------------------------------------------------------------------- update
    def lowp_output(self, streaming: bool = False):
        """Where AdamW writes the updated low-precision partition (None: it updates the fp32 params in place)."""
        return self.lowp_partition

    def publish_params(self, updated=None) -> None:
        """Nothing to do: AdamW wrote straight into the flat buffer the parameters are views of."""

    # ------------------------------------------------------------------------------------ accounting
    def model_state_bytes(self) -> dict:
        """Bytes of model states this rank holds, by kind (ZeRO §3.1's Ψ arithmetic, from what is allocated)."""
        S, m = self.layout.partition_numel, self.master_dtype.itemsize
        master = 0 if self.lowp_partition is None and not self.partitioned else m * S  # fp32 stage 0: aliased
        return {"params": self._param_bytes(), "grads": self._grad_bytes(), "optimizer": master + 2 * m * S}

    def _param_bytes(self) -> int:
        return self.layout.numel * self.dtype.itemsize   # whole parameters on every rank

    def _grad_bytes(self) -> int:
        return self.layout.numel * self.dtype.itemsize   # whole gradients in each .grad

    # ----------------------------------------------------------------------------------- checkpoints
    def full_state(self, optimizer) -> dict:
        """name -> full fp32 arrays of master, exp_avg, exp_avg_sq (what a checkpoint stores per parameter)."""
        return {key: self.unpartition(arr) for key, arr in optimizer.partitions().items()}

    def unpartition(self, partition) -> dict:
        """name -> the whole parameter-shaped array, from this rank's partition of a flat array laid out like the
        master (an all-gather when partitioned: every rank must call it)."""
        return self.layout.unpartition(self.comm.all_gather(partition) if self.partitioned else partition)

    def load_full_state(self, optimizer, full: dict) -> None:
        """Inverse of full_state: cut this rank's partition out of full per-parameter arrays."""
        parts = {key: self.layout.partition(full[key], self.rank) for key in ("master", "exp_avg", "exp_avg_sq")}
        optimizer.load_partitions(parts)
        out = self.lowp_output()
        if out is not None:  # the low-precision parameters are always the rounded master
            out[...] = self.backend.cast(self.backend.asarray(parts["master"]), self.dtype)
        self.publish_params(out)

    def full_params(self) -> dict:
        """name -> the whole low-precision parameter (for model.safetensors)."""
        return self.flat.unflatten(self.flat.buffer)
