"""Parameter offload for ZeRO stage 3: each rank's low-precision parameter chunks in host memory or NVMe files.

ZeRO-Infinity §5 (infinity offload engine) and §6.1 (bandwidth-centric partitioning): with
`offload_param.device` cpu or nvme, a rank's partition of the fp16/bf16 parameters leaves the device. To gather
a parameter, each rank moves only *its own* chunk up the tiers (nvme -> host -> device) and the all-gather
assembles the whole parameter on every device: the slow-tier bandwidth in use grows with the number of ranks.
DeepSpeed's AsyncPartitionedParameterSwapper: chunks are read into a pool of `buffer_count` host buffers of
`buffer_size` elements each, asynchronously, ahead of use (the stage-3 prefetcher calls `swap_in_async` for
the next modules in its trace), and written back by the optimizer step, sub-group by sub-group
(`PartitionUpdate`). Under zero.Init the chunks arrive one parameter at a time (`write_chunk`), so the partition is
never whole in host memory. Host buffers that feed the device are pinned and the host -> device copy runs on the
copy stream beside compute (refimpl/memory/transfer.py).
"""
from __future__ import annotations

import bisect

import numpy as np

from .nvme import aligned_empty
from .transfer import CopyStream


class BufferPoolError(MemoryError):
    """The swap buffers cannot hold what must be in host memory at once."""


class ParamSwapper:
    def __init__(self, layout, rank: int, dtype, *, device: str, backend, ledger, store=None,
                 buffer_count: int = 5, buffer_size: int = 10**8, copies=None):
        if device not in ("cpu", "nvme"):
            raise ValueError(f"offload_param.device must be 'cpu' or 'nvme' here, got {device!r}")
        self.layout, self.rank, self.dtype = layout, rank, np.dtype(dtype)
        self.device, self.backend, self.ledger, self.store = device, backend, ledger, store
        self.buffer_count, self.buffer_size = int(buffer_count), int(buffer_size)
        self.copies = copies if copies is not None else CopyStream(backend, ledger)
        self._staged = 0     # host bytes of an updated partition waiting to be committed
        self._writes = []    # (buffer, handle, label) of writes in flight, oldest first
        nbytes = layout.partition_numel * self.dtype.itemsize
        if device == "cpu":
            self.host = self.copies.host_empty(nbytes).view(self.dtype)  # the host tier holds the partition
            self.host[...] = 0
            ledger.alloc("host", nbytes, "the parameter partition (offload_param=cpu)")
        else:
            largest = max((s.chunk for s in layout.slots), default=0)
            if largest > self.buffer_size:
                raise BufferPoolError(f"offload_param.buffer_size={self.buffer_size} elements cannot hold the "
                                      f"largest parameter chunk ({largest} elements); raise buffer_size")
            self.inflight: dict[str, tuple] = {}               # slot name -> (buffer, read handle)
            for s in layout.slots:
                self.store.allocate(self._key(s), s.chunk * self.dtype.itemsize)
            ledger.alloc("nvme", nbytes, "the parameter partition")
        self._starts = [s.offset for s in layout.slots]     # for finding the slots of a sub-group

    def _key(self, slot) -> str:
        return f"param.{slot.name}"

    # ------------------------------------------------------------------------------ write (init, update)
    def write_chunk(self, slot, chunk) -> None:
        """Put one parameter's chunk into the tier (zero.Init draws parameters one by one and calls this)."""
        if self.device == "cpu":
            self.layout.view(self.host, slot)[...] = self.backend.to_numpy(chunk)
            return
        buf = aligned_empty(chunk.nbytes).view(self.dtype)
        buf[...] = self.backend.to_numpy(chunk)
        self._write(buf, [(slot, buf)], slot.name)

    def _write(self, buf, pieces, label) -> None:
        """Start writing `pieces` ((slot, array) pairs, views of `buf`); bound the buffers held by writes."""
        self.ledger.alloc("host", buf.nbytes, f"the swap buffer of {label}")
        handles = [self.store.write(self._key(slot), piece) for slot, piece in pieces]
        self._writes.append((buf, handles, label))
        while len(self._writes) > self.buffer_count:
            self._finish_write()

    def _finish_write(self) -> None:
        buf, handles, label = self._writes.pop(0)
        with self.ledger.wait("host", "nvme", label):
            for h in handles:
                h.wait()
        if handles:
            t0 = self.ledger.t0
            self.ledger.add("transfer", min(h.start for h in handles) - t0, max(h.end for h in handles) - t0,
                            src="host", dst="nvme", nbytes=buf.nbytes, label=label)
        self.ledger.free("host", buf.nbytes)

    def finish_writes(self) -> None:
        while self._writes:
            self._finish_write()

    def slots_between(self, lo: int, hi: int) -> list:
        """The slots whose chunks fill partition elements [lo, hi) exactly (a parameter-aligned sub-group)."""
        i, j = bisect.bisect_left(self._starts, lo), bisect.bisect_left(self._starts, hi)
        slots = self.layout.slots[i:j]
        end = slots[-1].offset + slots[-1].chunk if slots else lo
        if (slots and slots[0].offset != lo) or end != hi:
            raise ValueError(f"partition range [{lo}, {hi}) does not start and end at parameter boundaries; "
                             f"offloaded sub-groups must hold whole parameter chunks")
        return slots

    def begin_update(self) -> "PartitionUpdate":
        """The optimizer is about to write new values: returns where its sub-groups go (see PartitionUpdate)."""
        if self.device == "nvme":
            while self.inflight:   # reads of the old values must not land after the new ones are written
                self._drain_one()
        return PartitionUpdate(self)

    # --------------------------------------------------------------------------------------- swap in
    def swap_in_async(self, slot) -> bool:
        """Start reading `slot`'s chunk from NVMe into a pool buffer; False when the pool is full."""
        if self.device == "cpu" or slot.name in self.inflight:
            return True
        nbytes = slot.chunk * self.dtype.itemsize
        if len(self.inflight) >= self.buffer_count or not self.ledger.fits("host", nbytes):
            return False
        buf = self.copies.host_empty(nbytes).view(self.dtype)  # 4096-aligned (O_DIRECT reads it directly), pinned
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
                buf = self.copies.host_empty(nbytes).view(self.dtype)
                handle = self.store.read(self._key(slot), buf)
            with self.ledger.wait("nvme", "host", slot.name):
                handle.wait()                     # verified: a swap file changed behind our back is an error
            self.ledger.add("transfer", handle.start - self.ledger.t0, handle.end - self.ledger.t0,
                            src="nvme", dst="host", nbytes=buf.nbytes, label=slot.name)  # when the disk was busy
            self.ledger.free("host", buf.nbytes)
            chunk = buf
        return self.copies.to_device(chunk, slot.name)   # the copy keeps `chunk` until it is done

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
        if isinstance(partition, PartitionUpdate):
            partition.finish()
            return
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

    def read_chunk(self, slot) -> np.ndarray:
        """This rank's chunk of one parameter, as a host array (the optimizer's fp32 master is built from it)."""
        if self.device == "cpu":
            return self.layout.view(self.host, slot)
        out = np.empty(slot.chunk, dtype=self.dtype)
        self.store.read_sync(self._key(slot), out)    # verified
        return out

    def full_partition(self) -> np.ndarray:
        """This rank's whole low-precision partition as a host array (checkpoints)."""
        if self.device == "cpu":
            return self.host.copy()
        out = np.empty(self.layout.partition_numel, dtype=self.dtype)
        for s in self.layout.slots:
            self.store.read_sync(self._key(s), self.layout.view(out, s))   # verified
        return out


class PartitionUpdate:
    """Where the offloaded optimizer writes the new low-precision parameters, one sub-group at a time, so the
    write-back to NVMe of sub-group i overlaps the step of sub-group i+1 (DeepSpeed's stage 3 swaps out a
    sub-group's fp16 partitions right after its step) and the whole partition never sits in host memory.

        buf = update.buffer(lo, hi)     # host array for partition elements [lo, hi)
        ... the optimizer writes buf ...
        update.done(lo, hi, buf)        # NVMe: start writing the sub-group's parameter chunks
        update.finish()                 # wait for every write (publish_params calls it through commit)
    """

    def __init__(self, swapper: ParamSwapper):
        self.swapper = swapper

    def buffer(self, lo: int, hi: int):
        sw = self.swapper
        if sw.device == "cpu":
            return sw.host[lo:hi]                     # the host tier itself
        return aligned_empty((hi - lo) * sw.dtype.itemsize).view(sw.dtype)

    def done(self, lo: int, hi: int, buf) -> None:
        sw = self.swapper
        if sw.device == "cpu":
            return
        pieces = [(s, buf[s.offset - lo:s.offset - lo + s.chunk]) for s in sw.slots_between(lo, hi)]
        sw._write(buf, pieces, f"parameters of sub-group [{lo}, {hi})")

    def finish(self) -> None:
        if self.swapper.device == "nvme":
            self.swapper.finish_writes()
