"""ZeRO stage 2, gradient partitioning (P_os+g, ZeRO §5.2).

On top of stage 1, gradients are partitioned too: as soon as a parameter's gradient is complete in backward
(its post-accumulate-grad hook), it joins a bucket; a full bucket (`reduce_bucket_size` elements) is
reduce-scattered, each rank adds the rows it owns into its gradient partition, and the whole gradients are
freed. Per rank: whole parameters 2Ψ + gradient partition 2Ψ/N + optimizer partition 12Ψ/N.
Reduction happens during backward, micro-batch by micro-batch, which is what lets it overlap compute.
"""
from __future__ import annotations


from .stage1 import OptimizerStatePartitioning


class GradientPartitioning(OptimizerStatePartitioning):
    stage = 2

    def _init_params_and_master(self):
        super()._init_params_and_master()
        # gradient partition in the parameters' dtype (DeepSpeed keeps fp16 grads; reductions run in fp32)
        self.grad_partition = self._grad_partition_buffer(self.layout.partition_numel)  # device, or host
        self.bucket_size = self.config["zero_optimization"]["reduce_bucket_size"]
        self._bucket: list[str] = []
        self._bucket_numel = 0
        self._grads_in_flight = []   # (HostCopy, slots): reduced buckets on their way to the host partition
        for name, p in self.params.items():
            p.register_post_accumulate_grad_hook(lambda p, name=name: self._grad_ready(name))

    def _grad_ready(self, name: str) -> None:
        self._bucket.append(name)
        self._bucket_numel += self.params[name].size
        if self._bucket_numel >= self.bucket_size:
            self._reduce_bucket()

    def _reduce_bucket(self) -> None:
        """Reduce-scatter the bucket's gradients; accumulate this rank's rows; free the whole gradients."""
        if not self._bucket:
            return
        slots = [self.layout.by_name[n] for n in self._bucket]
        mdt = self.master_dtype
        rows = self.layout.to_rows({n: self.params[n].grad for n in self._bucket}, dtype=mdt, slots=slots)
        # the mean over ranks before it is stored: a sum could overflow the fp16 partition N times sooner
        mine = self.comm.reduce_scatter(rows.reshape(-1)) / mdt.type(self.world_size)  # (sum of chunks,) fp32
        for s in slots:
            self.params[s.name].grad = None                          # the whole gradient is gone
        if self.grads_on_host:  # ZeRO-Offload: into pinned host memory on the copy stream; added in once it lands
            label = f"reduced gradients of {len(slots)} parameters"
            self.ledger.budget.alloc("host", mine.nbytes, f"the pinned buffer of {label}")   # freed once added in
            out = self.copies.host_empty(mine.nbytes).view(mdt)
            self._grads_in_flight.append((self.copies.to_host(mine, out, label), slots))
            self._accumulate_landed(wait=False)
        else:
            self._accumulate(mine, slots)
        self._bucket, self._bucket_numel = [], 0

    def _accumulate(self, mine, slots) -> None:
        """grad_partition[slot] += this bucket's reduced rows (fp32 sum, stored in the parameters' dtype)."""
        col = 0
        for s in slots:
            view = self.layout.view(self.grad_partition, s)
            view[...] = (view.astype(self.master_dtype) + mine[col:col + s.chunk]).astype(self.dtype)
            col += s.chunk

    def _accumulate_landed(self, wait: bool) -> None:
        """Add in the buckets whose copies have landed, in order (all of them, waiting, when `wait`)."""
        while self._grads_in_flight and (wait or self._grads_in_flight[0][0].done()):
            copy, slots = self._grads_in_flight.pop(0)
            self._accumulate(copy.wait(), slots)
            self.ledger.budget.free("host", copy.out.nbytes)

    def after_backward(self) -> None:
        self._reduce_bucket()  # the last, partly filled bucket
        self._accumulate_landed(wait=True)

    def reduce_gradients(self):
        """The gradient partition as stored (fp16/bf16 here): the optimizer kernels upcast it sub-group by
        sub-group, so no fp32 copy of the whole partition (4 bytes per parameter) is ever made."""
        return self.grad_partition

    def zero_grads(self) -> None:
        self.grad_partition[...] = 0
        self.model.zero_grad()

    def _grad_bytes(self) -> int:
        return self.layout.partition_numel * self.dtype.itemsize
