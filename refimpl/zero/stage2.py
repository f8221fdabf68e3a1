"""ZeRO stage 2, gradient partitioning (P_os+g, ZeRO §5.2).

As in stage 1, each rank keeps only its partition of the fp32 optimizer states and whole low-precision
parameters; gradients are partitioned too: reduce-scattered in buckets during backward as they become complete
(zero/buckets.py), so only this rank's gradient partition outlives backward. Per rank: whole parameters 2Ψ +
gradient partition 2Ψ/N + optimizer partition 12Ψ/N. What the engine calls: zero/base.py.
"""
from __future__ import annotations

from ..deferred_init import materialize_all
from .base import ZeroStage
from .buckets import GradientBuckets
from .flat import FlatParams


class GradientPartitioning(ZeroStage):
    stage = 2
    partitioned = True

    def _init_states(self):
        materialize_all(self.model)   # a model built inside zero.Init(): stages 0-2 keep whole parameters
        self.flat = FlatParams(self.params.items(), self.backend, self.dtype)   # whole low-precision parameters
        full = {n: p.data for n, p in self.params.items()}
        self.master = self.layout.partition(full, self.rank, dtype=self.master_dtype)   # this rank's slice only
        self.lowp_partition = self.backend.cast(self.master, self.dtype)  # what the all-gather sends
        # the gradient partition in the parameters' dtype (DeepSpeed keeps fp16 grads; reductions run in fp32),
        # on the device, or on the host when the optimizer is there
        self.grad_partition = self.grads.zeros(self.layout.partition_numel, self.dtype)
        self.buckets = GradientBuckets(self.params, self.layout, self.comm, self.grad_partition,
                                       bucket_size=self.cfg.reduce_bucket_size, dtype=self.dtype,
                                       master_dtype=self.master_dtype, tier=self.grads)

    def after_backward(self) -> None:
        self.buckets.flush()   # the last, partly filled bucket, and every reduced bucket still on its way

    def reduce_gradients(self):
        """The gradient partition as stored (fp16/bf16 here): the optimizer kernels upcast it sub-group by
        sub-group, so no fp32 copy of the whole partition (4 bytes per parameter) is ever made."""
        return self.grad_partition

    def apply_update(self, grad, *, lr, grad_scale) -> None:
        """AdamW on this rank's partition writes its low-precision copy; an all-gather of the copies gives every
        rank the whole new model."""
        self._step(grad, lr, grad_scale, out_lowp=self.lowp_partition)
        self._all_gather_params()

    def _all_gather_params(self) -> None:
        self.flat.assign(self.layout.unpartition(self.comm.all_gather(self.lowp_partition)))

    def zero_grads(self) -> None:
        self.buckets.reset()
        self.model.zero_grad()

    def full_params(self) -> dict:
        return self.flat.unflatten(self.flat.buffer)

    def _load_lowp(self, lowp) -> None:
        self.lowp_partition[...] = lowp
        self._all_gather_params()

    def _param_bytes(self) -> int:
        return self.layout.numel * self.dtype.itemsize   # whole parameters on every rank

    def _grad_bytes(self) -> int:
        return self.layout.partition_numel * self.dtype.itemsize

    def _grad_partition_on_host(self) -> bool:
        return self.grads.on_host
