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
copy stream beside compute (refimpl/memory/transfer.py). The tier is a store (refimpl/memory/store.py): a
HostStore's chunks are in host memory already (nothing to read ahead), a disk store's are read into the pool.
"""
from __future__ import annotations

import bisect

import numpy as np

from .store import aligned_empty
from .transfer import CopyStream


class BufferPoolError(MemoryError):
    """The swap buffers cannot hold what must be in host memory at once."""


class ParamSwapper:
    def __init__(self, layout, rank: int, dtype, *, store, backend, ledger, buffer_count: int = 5,
                 buffer_size: int = 10**8, copies=None):
        self.layout, self.rank, self.dtype = layout, rank, np.dtype(dtype)
        self.store, self.backend, self.ledger = store, backend, ledger
        self.buffer_count, self.buffer_size = int(buffer_count), int(buffer_size)
        self.copies = copies if copies is not None else CopyStream(backend, ledger)
        self._staged = 0     # host bytes of an updated partition waiting to be committed
        self._writes = []    # (buffer, handles, label) of writes in flight, oldest first
        self.inflight: dict[str, tuple] = {}   # slot name -> (buffer, read handle, host bytes it holds)
        largest = max((s.chunk for s in layout.slots), default=0)
        if not store.resident and largest > self.buffer_size:
            raise BufferPoolError(f"offload_param.buffer_size={self.buffer_size} elements cannot hold the "
                                  f"largest parameter chunk ({largest} elements); raise buffer_size")
        ledger.budget.alloc(store.tier, layout.partition_numel * self.dtype.itemsize, "the parameter partition")
        sizes = [(self._key(s), s.chunk * self.dtype.itemsize) for s in layout.slots]
        if store.resident:   # one host array, each chunk a view of it: the optimizer updates a sub-group in place
            self.host_partition = store.allocate_contiguous(sizes).view(self.dtype)
        else:
            self.host_partition = None
            for key, nbytes in sizes:
                store.allocate(key, nbytes)
        self._starts = [s.offset for s in layout.slots]     # for finding the slots of a sub-group

    def _key(self, slot) -> str:
        return f"param.{slot.name}"

    # ------------------------------------------------------------------------------ write (init, update)
    def write_chunk(self, slot, chunk) -> None:
        """Put one parameter's chunk into the tier (zero.Init draws parameters one by one and calls this)."""
        buf = aligned_empty(chunk.nbytes).view(self.dtype)
        buf[...] = self.backend.to_numpy(chunk)
        self._write(buf, [(slot, buf)], slot.name)

    def _write(self, buf, pieces, label) -> None:
        """Start writing `pieces` ((slot, array) pairs, views of `buf`); bound the buffers held by writes."""
        self.ledger.budget.alloc("host", buf.nbytes, f"the swap buffer of {label}")
        handles = [self.store.write(self._key(slot), piece) for slot, piece in pieces]
        self._writes.append((buf, handles, label))
        while len(self._writes) > self.buffer_count:
            self._finish_write()

    def _finish_write(self) -> None:
        buf, handles, label = self._writes.pop(0)
        self.ledger.record_io(handles, "host", self.store.tier, label)
        self.ledger.budget.free("host", buf.nbytes)

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
        self._drop_reads_ahead()
        return PartitionUpdate(self)

    # --------------------------------------------------------------------------------------- swap in
    def _read(self, slot) -> tuple:
        """Start moving `slot`'s chunk into host memory: (host array, read handle, host bytes charged). A host
        tier's chunk is there already: its own array, read in place (a no-op)."""
        key, nbytes = self._key(slot), slot.chunk * self.dtype.itemsize
        if self.store.resident:
            buf, cost = self.store.view(key).view(self.dtype), 0
        else:
            self.ledger.budget.alloc("host", nbytes, f"the swap buffer of {slot.name}")   # raises over the budget
            buf, cost = self.copies.host_empty(nbytes).view(self.dtype), nbytes  # 4096-aligned, pinned
        return buf, self.store.read(key, buf), cost

    def swap_in_async(self, slot) -> bool:
        """Start reading `slot`'s chunk from the tier into a pool buffer; False when the pool is full."""
        if self.store.resident or slot.name in self.inflight:
            return True
        nbytes = slot.chunk * self.dtype.itemsize
        if len(self.inflight) >= self.buffer_count or not self.ledger.budget.fits("host", nbytes):
            return False
        self.inflight[slot.name] = self._read(slot)
        return True

    def ready(self, slot) -> bool:
        """Is `slot`'s chunk in host memory already (so gathering it will not wait on the disk)?"""
        return self.store.resident or (slot.name in self.inflight and self.inflight[slot.name][1].done())

    def to_device(self, slot):
        """This rank's chunk of `slot` on the device, ready for the all-gather (waits for its read)."""
        # read ahead by the prefetcher: take it from the pool; else read it now, outside the pool (never drop
        # reads issued ahead: they are needed next)
        buf, handle, cost = self.inflight.pop(slot.name) if slot.name in self.inflight else self._read(slot)
        self.ledger.record_io([handle], self.store.tier, "host", slot.name)   # verified reads
        self.ledger.budget.free("host", cost)
        return self.copies.to_device(buf, slot.name)   # the copy keeps `buf` until it is done

    def _drop_reads_ahead(self) -> None:
        """Reads of the old values must not land after the new ones are written: finish and drop them."""
        while self.inflight:
            name = next(iter(self.inflight))
            buf, handle, cost = self.inflight.pop(name)
            handle.wait()
            self.ledger.budget.free("host", cost)

    # ---------------------------------------------------------------------------------- update / save
    def partition_for_update(self):
        """The host array the optimizer writes the whole new low-precision partition into (then `commit`)."""
        nbytes = self.layout.partition_numel * self.dtype.itemsize
        self.ledger.budget.alloc("host", nbytes, "the updated parameter partition on its way to the parameter tier")
        self._staged = nbytes
        return np.empty(self.layout.partition_numel, dtype=self.dtype)

    def commit(self, partition) -> None:
        """After partition_for_update was written: write every chunk back to the tier (and wait)."""
        self._drop_reads_ahead()
        handles = [self.store.write(self._key(s), np.ascontiguousarray(self.layout.view(partition, s)))
                   for s in self.layout.slots]
        self.ledger.record_io(handles, "host", self.store.tier, "parameter partition")
        self.ledger.budget.free("host", self._staged)
        self._staged = 0

    def read_chunk(self, slot) -> np.ndarray:
        """This rank's chunk of one parameter, as a host array (the optimizer's fp32 master is built from it)."""
        out = np.empty(slot.chunk, dtype=self.dtype)
        self.store.read(self._key(slot), out).wait()    # verified
        return out

    def full_partition(self) -> np.ndarray:
        """This rank's whole low-precision partition as a host array (checkpoints)."""
        out = np.empty(self.layout.partition_numel, dtype=self.dtype)
        handles = [self.store.read(self._key(s), self.layout.view(out, s)) for s in self.layout.slots]
        for h in handles:
            h.wait()                                    # verified
        return out


class PartitionUpdate:
    """Where the offloaded optimizer writes the new low-precision parameters, one sub-group at a time, so the
    write-back to the tier of sub-group i overlaps the step of sub-group i+1 (DeepSpeed's stage 3 swaps out a
    sub-group's fp16 partitions right after its step) and the whole partition never sits in host memory.

        pieces = update.pieces(lo, hi)  # [(start, stop, host array)] covering partition elements [lo, hi)
        ... the optimizer writes each array ...
        update.done(lo, hi, pieces)     # start writing the sub-group's parameter chunks
        update.finish()                 # wait for every write

    A host tier's piece is its own array (the chunks of a sub-group are consecutive views of one allocation),
    written in place: nothing to copy. A disk tier's is one buffer, written to the swap files by done().
    """

    def __init__(self, swapper: ParamSwapper):
        self.swapper, self.dtype = swapper, swapper.dtype

    def pieces(self, lo: int, hi: int) -> list:
        sw = self.swapper
        if sw.host_partition is not None:
            return [(lo, hi, sw.host_partition[lo:hi])]   # written in place: any range will do
        sw.slots_between(lo, hi)        # (whole chunks only: done() writes them to their swap files)
        return [(lo, hi, aligned_empty((hi - lo) * sw.dtype.itemsize).view(sw.dtype))]

    def done(self, lo: int, hi: int, pieces) -> None:
        sw = self.swapper
        if sw.host_partition is not None:
            return                      # written in place
        (_, _, buf), = pieces
        chunks = [(s, buf[s.offset - lo:s.offset - lo + s.chunk]) for s in sw.slots_between(lo, hi)]
        sw._write(buf, chunks, f"parameters of sub-group [{lo}, {hi})")

    def finish(self) -> None:
        self.swapper.finish_writes()
