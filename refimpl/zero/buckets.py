"""Bucketed reduce-scatter of gradients during backward, for ZeRO stages 2 and 3 (ZeRO §5.2, P_g).

As soon as a parameter's gradient is complete in backward (its post-accumulate-grad hook), it joins a bucket; a
full bucket (``reduce_bucket_size`` elements) is reduce-scattered, each rank adds the rows it owns into its
gradient partition, and the whole gradients are freed. Reduction happens during backward, micro-batch by
micro-batch, which is what lets it overlap compute; only the partition (2Ψ/N bytes) outlives backward.
The reduced rows are summed in fp32 and divided by N before they are stored in the parameters' dtype (a sum
could overflow an fp16 partition N times sooner), as DeepSpeed's stage_1_and_2.py / stage3.py do.

With the optimizer offloaded (ZeRO-Offload) the partition lives in pinned host memory, and the adding is still
done on the device, as DeepSpeed's "accumulate grad in cpu via gpu" does: the first micro-batch of a step rounds
its reduced rows there and copies them straight into place (the old values are dead: no zeroing pass, no host
arithmetic); a later micro-batch copies the partition's old values up, adds, and copies the sums back. Every
copy runs on the copy stream (refimpl/memory/transfer.py), so backward goes on meanwhile.
"""
from __future__ import annotations


class GradientBuckets:
    def __init__(self, params: dict, layout, comm, grad_partition, *, bucket_size: int, dtype, master_dtype,
                 tier, settle=None):
        self.params, self.layout, self.comm = params, layout, comm
        self.grad_partition = grad_partition      # this rank's partition: device, or host (tier.on_host)
        self.bucket_size, self.dtype, self.master_dtype = bucket_size, dtype, master_dtype
        self.tier = tier                          # zero/grad_offload.py
        self.settle = settle                      # waits for a host update still reading the partition
        self._bucket: list[str] = []
        self._bucket_numel = 0
        self._in_flight = []   # HostCopy: reduced rows on their way into the host partition
        self._fresh, self._written = tier.on_host, set()   # host partition: nothing accumulated since reset()
        for name, p in params.items():
            p.register_post_accumulate_grad_hook(lambda p, name=name: self.grad_ready(name))

    def grad_ready(self, name: str) -> None:
        """A parameter's gradient is complete: into the bucket, and reduce the bucket once it is full."""
        self._bucket.append(name)
        self._bucket_numel += self.params[name].size
        if self._bucket_numel >= self.bucket_size:
            self.reduce_bucket()

    def reduce_bucket(self) -> None:
        """Reduce-scatter the bucket's gradients; accumulate this rank's rows; free the whole gradients."""
        if not self._bucket:
            return
        slots = [self.layout.by_name[n] for n in self._bucket]
        mdt = self.master_dtype
        rows = self.layout.to_rows({n: self.params[n].grad for n in self._bucket}, dtype=mdt, slots=slots)
        mine = self.comm.reduce_scatter(rows.reshape(-1)) / mdt.type(self.comm.world_size)  # (sum of chunks,)
        for s in slots:
            self.params[s.name].grad = None                          # the whole gradient is gone
        if self.tier.on_host:
            self._accumulate_via_device(mine, slots)
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

    def _accumulate_via_device(self, mine, slots) -> None:
        """ZeRO-Offload: the same sum as _accumulate, on the device, into the pinned host partition."""
        be, copies = self.tier.backend, self.tier.copies
        label = f"reduced gradients of {len(slots)} parameters"
        if self.settle is not None:
            self.settle()                           # the last step's host update has read its gradients
        old = be.zeros(mine.shape, self.dtype)      # laid out like `mine`: the bucket's slots one after another
        if not self._fresh:                         # the partition's old values up from the host
            col = 0
            for s in slots:
                copies.to_device(self.layout.view(self.grad_partition, s), label, out=old[col:col + s.chunk])
                col += s.chunk
        sums = (old.astype(self.master_dtype) + mine).astype(self.dtype)   # _accumulate's arithmetic, all at once
        col = 0
        for s in slots:
            self._in_flight.append(copies.to_host(sums[col:col + s.chunk], self.layout.view(self.grad_partition, s),
                                                  label))
            col += s.chunk
        self._written.update(s.name for s in slots)

    def reset(self) -> None:
        """A new step: forget the accumulated gradients (the host partition is overwritten by the first bucket)."""
        if self.tier.on_host:
            self._fresh, self._written = True, set()
        else:
            self.grad_partition[...] = 0

    def flush(self) -> None:
        """End of backward: reduce the last, partly filled bucket and wait for every copy still in flight."""
        self.reduce_bucket()
        for copy in self._in_flight:
            copy.wait()
        self._in_flight = []
        if self._fresh:              # slots no gradient reached this time still hold an old step's values
            for s in self.layout.slots:
                if s.name not in self._written:
                    self.layout.view(self.grad_partition, s)[...] = 0
            self._fresh = False
