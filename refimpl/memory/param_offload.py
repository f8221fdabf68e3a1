"""Parameter offload for ZeRO stage 3: each rank's low-precision parameter chunks in host memory or NVMe files.

ZeRO-Infinity §5 (infinity offload engine) and §6.1 (bandwidth-centric partitioning): with
`offload_param.device` cpu or nvme, a rank's partition of the fp16/bf16 parameters leaves the device. To gather
a parameter, each rank moves only *its own* chunk up the tiers (nvme -> host -> device) and the all-gather
assembles the whole parameter on every device: the slow-tier bandwidth in use grows with the number of ranks.
DeepSpeed's AsyncPartitionedParameterSwapper: chunks are read into a pool of `buffer_count` host buffers of
`buffer_size` elements each, asynchronously, ahead of use (the stage-3 prefetcher calls `swap_in_async` for
the next modules in its trace), and written back after the optimizer step.
"""
from __future__ import annotations

import numpy as np

from .nvme import aligned_empty


class BufferPoolError(MemoryError):
    """The swap buffers cannot hold what must be in host memory at once."""


class ParamSwapper:
    def __init__(self, layout, rank: int, dtype, *, device: str, backend, ledger, initial_partition,
                 store=None, buffer_count: int = 5, buffer_size: int = 10**8):
        if device not in ("cpu", "nvme"):
            raise ValueError(f"offload_param.device must be 'cpu' or 'nvme' here, got {device!r}")
        self.layout, self.rank, self.dtype = layout, rank, np.dtype(dtype)
        self.device, self.backend, self.ledger, self.store = device, backend, ledger, store
        self.buffer_count, self.buffer_size = int(buffer_count), int(buffer_size)
        self._staged = 0   # host bytes of an updated partition waiting to be committed
        host = np.array(backend.to_numpy(initial_partition), dtype=self.dtype, copy=True)
        if device == "cpu":
            self.host = host                                   # the host tier holds the whole partition
            ledger.alloc("host", host.nbytes, "the parameter partition (offload_param=cpu)")
        else:
            largest = max(s.chunk for s in layout.slots)
            if largest > self.buffer_size:
                raise BufferPoolError(f"offload_param.buffer_size={self.buffer_size} elements cannot hold the "
                                      f"largest parameter chunk ({largest} elements); raise buffer_size")
            self.inflight: dict[str, tuple] = {}               # slot name -> (buffer, read handle)
            for s in layout.slots:
                self.store.allocate(self._key(s), s.chunk * self.dtype.itemsize)
            self.commit(host)
            ledger.alloc("nvme", host.nbytes, "the parameter partition")

    def _key(self, slot) -> str:
        return f"param.{slot.name}"

    # --------------------------------------------------------------------------------------- swap in
    def swap_in_async(self, slot) -> bool:
        """Start reading `slot`'s chunk from NVMe into a pool buffer; False when the pool is full."""
        if self.device == "cpu" or slot.name in self.inflight:
            return True
        nbytes = slot.chunk * self.dtype.itemsize
        if len(self.inflight) >= self.buffer_count or not self.ledger.fits("host", nbytes):
            return False
        buf = aligned_empty(nbytes).view(self.dtype)  # 4096-aligned: O_DIRECT reads it without a bounce copy
        self.ledger.alloc("host", nbytes, f"the swap buffer of {slot.name}")
        self.inflight[slot.name] = (buf, self.store.read(self._key(slot), buf))
        return True

    def ready(self, slot) -> bool:
        """Is `slot`'s chunk in host memory already (so gathering it will not wait on the disk)?"""
        return self.device == "cpu" or (slot.name in self.inflight and self.inflight[slot.name][1].done())

    def to_device(self, slot):
        """This rank's chunk of `slot` on the device, ready for the all-gather (waits for its read)."""
        if self.device == "cpu":
            chunk = self.layout.view(self.host, slot)
        else:
            if slot.name in self.inflight:      # read ahead by the prefetcher: take it from the pool
                buf, handle = self.inflight.pop(slot.name)
            else:                               # not read ahead: read it now, outside the pool (never drop
                nbytes = slot.chunk * self.dtype.itemsize   # reads issued ahead: they are needed next)
                self.ledger.alloc("host", nbytes, f"the swap buffer of {slot.name}")  # raises over the budget
                buf = aligned_empty(nbytes).view(self.dtype)
                handle = self.store.read(self._key(slot), buf)
            with self.ledger.wait("nvme", "host", slot.name):
                handle.wait()
            self.store.verify(self._key(slot), buf)   # a swap file changed behind our back is an error, not data
            self.ledger.add("transfer", handle.start - self.ledger.t0, handle.end - self.ledger.t0,
                            src="nvme", dst="host", nbytes=buf.nbytes, label=slot.name)  # when the disk was busy
            self.ledger.free("host", buf.nbytes)
            chunk = buf
        with self.ledger.transfer("host", "device", chunk.nbytes, slot.name):
            return self.backend.asarray(chunk).copy()

    def _drain_one(self) -> None:
        """The pool is full of reads nobody asked for yet (a stale prefetch): finish and drop the oldest."""
        name = next(iter(self.inflight))
        buf, handle = self.inflight.pop(name)
        handle.wait()
        self.ledger.free("host", buf.nbytes)

    # ---------------------------------------------------------------------------------- update / save
    def partition_for_update(self):
        """The host array the optimizer writes the new low-precision partition into."""
        if self.device == "cpu":
            return self.host
        nbytes = self.layout.partition_numel * self.dtype.itemsize
        self.ledger.alloc("host", nbytes, "the updated parameter partition on its way to NVMe")
        self._staged = nbytes
        return np.empty(self.layout.partition_numel, dtype=self.dtype)

    def commit(self, partition) -> None:
        """After an update: nothing more on the host tier; NVMe: write every chunk back (and wait)."""
        if self.device == "cpu":
            if partition is not self.host:
                self.host[...] = partition
            return
        while self.inflight:       # reads of the old values must not land after the new ones are written
            self._drain_one()
        start = self.ledger._now()
        handles = [self.store.write(self._key(s), np.ascontiguousarray(self.layout.view(partition, s)))
                   for s in self.layout.slots]
        with self.ledger.wait("host", "nvme", "parameter partition"):
            for h in handles:
                h.wait()
        self.ledger.add("transfer", start, self.ledger._now(), src="host", dst="nvme",
                        nbytes=partition.nbytes, label="parameter partition")
        self.ledger.free("host", self._staged)
        self._staged = 0

    def full_partition(self) -> np.ndarray:
        """This rank's whole low-precision partition as a host array (checkpoints)."""
        if self.device == "cpu":
            return self.host.copy()
        out = np.empty(self.layout.partition_numel, dtype=self.dtype)
        for s in self.layout.slots:
            self.store.read_sync(self._key(s), self.layout.view(out, s))   # verified
        return out
