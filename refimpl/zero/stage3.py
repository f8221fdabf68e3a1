"""ZeRO stage 3, parameter partitioning (P_os+g+p, ZeRO §5.3; ZeRO-Infinity §5).

On top of stage 2, the low-precision parameters are partitioned as well: rank r stores only its chunk of
every parameter (`ds_tensor`, a view into its partition), so model states per rank are 16Ψ/N. A module's
parameters are gathered (all-gather, Ψ in total per pass) just before the module runs and released right
after, in forward and again in backward, through the module hooks of refimpl/nn.py — DeepSpeed's
`parameter_offload.py`. Each parameter carries DeepSpeed's status: NOT_AVAILABLE (only the chunk is here),
INFLIGHT (an all-gather is under way), AVAILABLE (whole). Parameters with fewer elements than
`stage3_param_persistence_threshold` stay whole all the time (gathering them costs more in latency than
they save in memory). Which parameters to gather ahead of time is the job of the coordinator
(refimpl/zero/prefetch.py). Gradients are reduce-scattered in buckets during backward, as in stage 2
(zero/buckets.py). What the engine calls: zero/base.py.
"""
from __future__ import annotations

from ..backend import host_backend
from ..deferred_init import materialize_in_order
from .base import ZeroStage
from .buckets import GradientBuckets
from .partition import ZeroParamStatus
from .prefetch import PartitionedParameterCoordinator


class ParameterPartitioning(ZeroStage):
    stage = 3
    partitioned = True

    def _init_states(self):
        self.swapper = self._make_swapper()
        # the only copy of the parameters: this rank's chunks, here or (offloaded) in the host or NVMe tier only
        S = self.layout.partition_numel
        self.lowp_partition = None if self.swapper else self.backend.zeros((S,), self.dtype)
        # the fp32 master: assembled from master_pieces() by the base (or sent to the optimizer's offload tier)
        self.grad_partition = self.grads.zeros(S, self.dtype)   # device, or host with the optimizer offloaded
        self.buckets = GradientBuckets(self.params, self.layout, self.comm, self.grad_partition,
                                       bucket_size=self.cfg.reduce_bucket_size, dtype=self.dtype,
                                       master_dtype=self.master_dtype, tier=self.grads, settle=self._settle)
        self._empty = self.backend.zeros((0,), self.dtype)
        self._live_numel = 0      # elements of gathered (non-persistent) parameters: see gathered_numel
        for name, p in self.params.items():
            slot = self.layout.by_name[name]
            p.ds_name, p.ds_shape, p.ds_numel = name, slot.shape, slot.numel
            p.ds_slot = slot
            p.ds_tensor = None if self.swapper else self.layout.view(self.lowp_partition, slot)  # this rank's chunk
            p.ds_persist = slot.numel < self.cfg.param_persistence_threshold
            p.ds_stale = False        # a persistent parameter whose chunk changed since it was gathered
            p.ds_handle = p.ds_chunk = None
        self.coordinator = PartitionedParameterCoordinator(
            self, prefetch_bucket_size=self.cfg.prefetch_bucket_size,
            max_live_parameters=self.cfg.max_live_parameters, max_reuse_distance=self.cfg.max_reuse_distance)
        self._register_module_hooks()
        self._partition_as_drawn()

    def _partition_as_drawn(self):
        """zero.Init's second half, DeepSpeed's post-init partitioning: one parameter at a time, draw it (or take
        its eager value), keep this rank's low-precision chunk in the parameter tier and drop the rest. At no
        point are more than four whole parameters in memory: this one and the next three, drawn meanwhile
        (refimpl/zero/init.py)."""
        params = list(self.params.values())
        drawn = materialize_in_order(p.data for p in params)   # the next few drawn on worker threads meanwhile
        if self.progress:
            from tqdm import tqdm
            params = tqdm(params, total=len(self.params), unit="param", desc=f"rank {self.rank}: partitioning",
                          disable=self.rank != 0)
        for p, full in zip(params, drawn):
            slot = p.ds_slot
            chunk = self.layout.chunk_of(slot, full, self.rank, dtype=self.dtype)
            if self.swapper is not None:
                self.swapper.write_chunk(slot, chunk)
            else:
                p.ds_tensor[...] = chunk
            if p.ds_persist:   # small: kept whole all the time
                p.data, p.ds_status = full.astype(self.dtype, copy=False), ZeroParamStatus.AVAILABLE
            else:              # partitioned from the start
                p.data, p.ds_status = self._empty, ZeroParamStatus.NOT_AVAILABLE
        if self.swapper is not None:
            self.swapper.finish_writes()

    def master_pieces(self):
        """This rank's fp32 master partition, one parameter chunk at a time, read back from the parameter tier:
        the optimizer's tier is filled without the partition ever being whole in memory."""
        for p in self.params.values():
            if self.swapper is None:
                yield self.backend.cast(p.ds_tensor, self.master_dtype)
            else:   # a host array: upcast on the host (the offloaded optimizer keeps it there)
                yield host_backend(self.backend).cast(self.swapper.read_chunk(p.ds_slot), self.master_dtype)

    def _make_swapper(self):
        off = self.cfg.offload_param
        if off is None:
            return None
        from ..memory.param_offload import ParamSwapper
        from ..memory.tiers import make_store
        # host arrays pinned (and 4096-aligned) for the copy stream
        store = make_store(off.device, off.swap_folder(3, "params", self.rank), self.cfg.aio,
                           empty=self.copies.host_empty)
        try:
            return ParamSwapper(self.layout, self.rank, self.dtype, store=store, backend=self.backend,
                                ledger=self.ledger, buffer_count=off.buffer_count, buffer_size=off.buffer_size,
                                copies=self.copies)
        except BaseException:
            store.close()   # its swap folder is given back at once
            raise

    # ------------------------------------------------------------------------------- gather / release
    def _chunk(self, p):
        """This rank's chunk of p on the device (bandwidth-centric: only our own shard crosses the tiers)."""
        self._settle(p.ds_slot)
        return p.ds_tensor if self.swapper is None else self.swapper.to_device(p.ds_slot)

    def swap_in_ahead(self, params) -> bool:
        """Start moving these parameters' chunks up from NVMe (the prefetcher calls this for modules ahead);
        False when the swap buffers are all in use."""
        if self.swapper is not None:
            for p in params:
                if p.ds_status is ZeroParamStatus.NOT_AVAILABLE and not self.swapper.swap_in_async(p.ds_slot):
                    return False
        return True

    @property
    def reads_ahead(self) -> bool:
        """Does gathering need reads from a disk tier first (that the prefetcher starts ahead)?"""
        return self.swapper is not None and not self.swapper.store.resident

    def chunk_ready(self, p) -> bool:
        """Can p's all-gather start without waiting on the disk or on the host update?"""
        s = p.ds_slot
        if self.cfg.offload_optimizer is not None and not self.optimizer.updated(s.offset + s.chunk):
            return False
        return self.swapper is None or self.swapper.ready(s)

    def gathered_bytes(self, p) -> int:
        return p.ds_slot.chunk * self.world_size * self.dtype.itemsize

    def all_gather_async(self, p) -> None:
        """Issue the all-gather of p's chunks; p is INFLIGHT until `wait_for` installs the result."""
        need = self.gathered_bytes(p)
        if not self.ledger.budget.fits("device", need):
            self.coordinator.evict(need)   # drop parameters kept only for reuse, then try again
        self.ledger.budget.alloc("device", need, f"gathering parameter {p.ds_name}")
        p.ds_chunk = self._chunk(p)
        p.ds_handle = self.comm.all_gather_async(p.ds_chunk)
        p.ds_status = ZeroParamStatus.INFLIGHT
        self._live_numel += p.ds_numel

    def wait_for(self, p) -> None:
        gathered = p.ds_handle.wait()                                # (N * chunk,)
        p.data = gathered[:p.ds_numel].reshape(p.ds_shape)
        p.ds_handle, p.ds_status = None, ZeroParamStatus.AVAILABLE
        self._done_with_chunk(p.ds_chunk)
        p.ds_chunk = None

    def _done_with_chunk(self, chunk) -> None:
        """The all-gather has read an offloaded chunk: its device copy can go (after the queued readers)."""
        if self.swapper is not None:
            self.copies.release(chunk)

    def fetch(self, params) -> None:
        """Make `params` whole: start the missing all-gathers, then wait for every one in flight."""
        for p in params:
            if p.ds_status is ZeroParamStatus.NOT_AVAILABLE:
                self.all_gather_async(p)
        for p in params:
            if p.ds_status is ZeroParamStatus.INFLIGHT:
                self.wait_for(p)

    def release(self, p) -> None:
        """Drop the whole parameter; only this rank's chunk remains."""
        if p.ds_persist or p.ds_status is not ZeroParamStatus.AVAILABLE:
            return
        p.data = self._empty
        p.ds_status = ZeroParamStatus.NOT_AVAILABLE
        self._live_numel -= p.ds_numel
        self.ledger.budget.free("device", self.gathered_bytes(p))

    def release_all(self) -> None:
        for p in self.params.values():
            if p.ds_status is ZeroParamStatus.INFLIGHT:
                self.wait_for(p)  # never leave a collective dangling
            self.release(p)

    def _register_module_hooks(self) -> None:
        c = self.coordinator
        for module in self.model.modules():
            if not module._parameters:
                continue
            persistent = [p for p in module._parameters.values() if p is not None and p.ds_persist]
            if persistent:   # gathered again on first use after an overlapped update
                module.register_forward_pre_hook(lambda m, args, ps=persistent: self._gather_persistent(ps))
            module.register_forward_pre_hook(lambda m, args: c.fetch_sub_module(m, forward=True))
            module.register_forward_hook(lambda m, args, out: c.release_sub_module(m, forward=True))
            module.register_full_backward_pre_hook(lambda m, g: c.fetch_sub_module(m, forward=False))
            module.register_full_backward_hook(lambda m, gi, go: c.release_sub_module(m, forward=False))

    # -------------------------------------------------------------------------------------- engine API
    def close(self) -> None:
        if self.optimizer is not None and self.cfg.offload_optimizer is not None:
            self.optimizer.settle()
        super().close()

    def after_backward(self) -> None:
        self.buckets.flush()   # the last, partly filled bucket, and every reduced bucket still on its way
        self.coordinator.end_of_pass()

    def reduce_gradients(self):
        """The gradient partition as stored (see stage 2): reduced bucket by bucket during backward."""
        return self.grad_partition

    def apply_update(self, grad, *, lr, grad_scale) -> None:
        """AdamW writes the new chunks: into the device partition (the ds_tensor views), or into the parameter
        tier, sub-group by sub-group when the optimizer is offloaded too (the write-back of one overlaps the step
        of the next); then the persistent parameters are gathered whole again. With the optimizer and parameters
        in host memory on a GPU, the host update runs beside the next forward (memory/overlapped_update.py): each
        parameter's gather first settles its own sub-group, and persistent ones are gathered again on first use."""
        overlap = self._overlap()
        if self.swapper is None:
            self._step(grad, lr, grad_scale, out_lowp=self.lowp_partition, overlap=overlap)
        elif self.cfg.offload_optimizer is not None:   # the step waits for the last sub-group's writes itself
            self._step(grad, lr, grad_scale, out_lowp=self.swapper.begin_update(), overlap=overlap)
        else:
            partition = self.swapper.partition_for_update()
            self._step(grad, lr, grad_scale, out_lowp=partition)
            self.swapper.commit(partition)
        for p in self.params.values():
            p.ds_stale = p.ds_persist
        if not overlap:
            self._gather_persistent()

    def _overlap(self) -> bool:
        """Can the host update run beside the next forward? Host tiers (nothing to read or write back) and a copy
        stream (the GPU's: on a CPU backend the forward and the update would share the same cores)."""
        off = self.cfg.offload_optimizer
        return (off is not None and self.optimizer.store.resident and self.copies.asynchronous
                and (self.swapper is None or self.swapper.store.resident))

    def _settle(self, slot=None) -> None:
        """Wait for the host update of the sub-groups holding `slot`'s chunk (every one when None)."""
        if self.cfg.offload_optimizer is not None:
            self.optimizer.settle(None if slot is None else slot.offset + slot.chunk)

    def _gather_persistent(self, params=None) -> None:
        """Gather the persistent parameters (of `params`) whose chunks changed since they were last gathered."""
        persistent = [p for p in (params if params is not None else self.params.values()) if p.ds_stale]
        chunks = [self._chunk(p) for p in persistent]
        handles = [self.comm.all_gather_async(c) for c in chunks]
        for p, h, c in zip(persistent, handles, chunks):
            p.data = h.wait()[:p.ds_numel].reshape(p.ds_shape)
            p.ds_stale = False
            self._done_with_chunk(c)

    def settle_all(self) -> None:
        """Finish an overlapped update: every parameter current (checkpoints, evaluation's end, the next backward)."""
        self._settle()
        self._gather_persistent()

    def zero_grads(self) -> None:
        self.buckets.reset()
        self.model.zero_grad()

    def _load_lowp(self, lowp) -> None:
        self.settle_all()
        if self.swapper is None:
            self.lowp_partition[...] = lowp
        else:
            partition = self.swapper.partition_for_update()
            partition[...] = self.backend.to_numpy(lowp)
            self.swapper.commit(partition)
        for p in self.params.values():
            p.ds_stale = p.ds_persist
        self._gather_persistent()

    def full_params(self) -> dict:
        self.settle_all()
        mine = self.lowp_partition if self.swapper is None else self.backend.asarray(self.swapper.full_partition())
        gathered = self.comm.all_gather(mine)
        return self.layout.unpartition(gathered)

    def _param_bytes(self) -> int:
        persistent = sum(p.ds_numel for p in self.params.values() if p.ds_persist)
        return (self.layout.partition_numel + persistent) * self.dtype.itemsize

    def _grad_bytes(self) -> int:
        return self.layout.partition_numel * self.dtype.itemsize

    def _grad_partition_on_host(self) -> bool:
        return self.grads.on_host

    def gathered_numel(self) -> int:
        """Elements of whole (non-persistent) parameters currently held: what max_live_parameters bounds (counted
        as gathers start and releases end them)."""
        return self._live_numel
