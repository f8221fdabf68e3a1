"""Host <-> device copies on a stream of their own, from page-locked memory (ZeRO-Infinity §6.2, overlap-centric
design; ZeRO-Offload §4.2: gradients copied to pinned CPU buffers as backward produces them).

A GPU has copy engines beside its compute units. A copy queued on a second stream, from or into page-locked
(pinned) host memory, runs while kernels run on the compute stream; pageable memory would make it synchronous.
Events order the two streams without blocking Python:

- host -> device (`to_device`): the copy does not wait for compute, so it runs beside the kernels queued before
  it; the compute stream waits on the copy's event before the kernels that read the result.
- device -> host (`to_host`): the copy waits for the compute queued so far (it reads what that produced); the
  host waits on its event only when it needs the bytes (`HostCopy.wait`), e.g. to accumulate a gradient bucket
  while backward goes on for the layers below.

The ledger sees these copies on the device's own timeline (`DeviceClock`): a transfer is the interval between
events recorded on the copy stream before and after it, and what the compute stream lost to a host -> device
copy is the interval between events recorded around its wait (zero when the copy was done in time). On CPU
backends (no `async_copies`) a copy is synchronous and recorded as before: all exposed.

Every buffer a queued copy touches is kept alive until its event says the copy is done: the memory pools would
otherwise hand the bytes to someone else while the copy engine still reads or writes them.
"""
from __future__ import annotations

import contextlib
import itertools

import numpy as np

from .store import aligned_empty


class DeviceClock:
    """Times of device events on the ledger's clock: one anchor event, synchronised once, and event differences."""

    def __init__(self, backend, ledger):
        self.backend = backend
        self.anchor = backend.event()
        self.anchor.record(backend.current_stream())
        self.anchor.synchronize()
        self.host0 = ledger.now()

    def time(self, event) -> float:
        event.synchronize()
        return self.host0 + self.backend.elapsed_ms(self.anchor, event) / 1e3


class HostCopy:
    """A device -> host copy in flight; `wait()` blocks until `out` holds the bytes, and returns it."""

    def __init__(self, copier, out, done, keep, label):
        self.copier, self.out, self.label = copier, out, label
        self._done, self._keep = done, keep

    def done(self) -> bool:
        return self._keep is None or self._done.done

    def wait(self):
        if self._keep is not None:
            with self.copier.ledger.wait("device", "host", self.label):
                self._done.synchronize()
            self._keep = None   # the source may be freed now
        return self.out


class CopyStream:
    """One rank's host <-> device copy stream and the ledger records of its copies."""

    def __init__(self, backend, ledger):
        self.backend, self.ledger = backend, ledger
        self.asynchronous = bool(getattr(backend, "async_copies", False))
        self._pending = []   # (kind, start event, end event, fields, step): ledger records to resolve
        self._keep = []      # (event, objects): buffers a queued copy still uses
        if self.asynchronous:
            self.stream = backend.stream()
            self.clock = DeviceClock(backend, ledger)
            ledger.on_flush(self.flush)
            ledger.device_timer = self

    # ------------------------------------------------------------------------------------------- memory
    def host_empty(self, nbytes: int) -> np.ndarray:
        """uint8 host buffer, 4096-aligned (O_DIRECT reads land in it) and pinned when copies are asynchronous."""
        empty = (lambda n, dtype: self.backend.pinned_empty((n,), dtype)) if self.asynchronous else np.empty
        return aligned_empty(nbytes, empty=empty)

    def _hold(self, event, *objects) -> None:
        self._keep.append((event, objects))
        self._keep = [(e, o) for e, o in self._keep if not e.done]

    # ------------------------------------------------------------------------------------------- copies
    def to_device(self, host, label: str = "", out=None):
        """A new device array (or the contiguous device array `out`) with host's contents. Asynchronous: later
        kernels on the compute stream wait for it."""
        be = self.backend
        if not self.asynchronous:
            with self.ledger.transfer("host", "device", host.nbytes, label):
                if out is None:
                    return be.asarray(host).copy()
                out[...] = be.asarray(host)
                return out
        compute = be.current_stream()
        if out is not None:       # it may have had readers or writers on the compute stream: after them
            dev, ready = out, be.event()
            ready.record(compute)
            self.stream.wait_event(ready)
        else:
            with self.stream:                   # allocated from the copy stream's pool (see release)
                dev = be.empty(host.shape, host.dtype)
        start, done = be.event(), be.event()
        start.record(self.stream)
        be.copy_async(_bytes(dev), _bytes(host), self.stream)
        done.record(self.stream)
        before, after = be.event(), be.event()
        before.record(compute)
        compute.wait_event(done)                # the GPU waits, not Python
        after.record(compute)
        self._hold(done, host)
        self._record("transfer", start, done, src="host", dst="device", nbytes=int(host.nbytes), label=label)
        self._record("wait", before, after, src="host", dst="device", label=label)
        return dev

    def release(self, dev) -> None:
        """`dev` (from to_device) has had all its readers queued on the compute stream, and any other stream's
        readers finished: its memory goes back to the copy stream's pool once the compute stream passed them."""
        if self.asynchronous:
            passed = self.backend.event()
            passed.record(self.backend.current_stream())
            self._hold(passed, dev)

    def to_host(self, dev, out, label: str = "") -> HostCopy:
        """Start copying `dev` (written by work queued on the compute stream) into the host array `out`."""
        be = self.backend
        if not self.asynchronous:
            with self.ledger.transfer("device", "host", dev.nbytes, label):
                out[...] = be.to_numpy(dev)
            return HostCopy(self, out, None, None, label)
        ready, start, done = be.event(), be.event(), be.event()
        ready.record(be.current_stream())
        self.stream.wait_event(ready)
        start.record(self.stream)
        be.copy_async(_bytes(out), _bytes(dev), self.stream)
        done.record(self.stream)
        self._record("transfer", start, done, src="device", dst="host", nbytes=int(dev.nbytes), label=label)
        return HostCopy(self, out, done, (dev,), label)

    # ------------------------------------------------------------------------------------------- ledger
    @contextlib.contextmanager
    def interval(self, kind: str, **fields):
        """Record `kind` from when the compute stream reaches the start of the block to when it finishes it."""
        start, end = self.backend.event(), self.backend.event()
        start.record(self.backend.current_stream())
        yield
        end.record(self.backend.current_stream())
        self._record(kind, start, end, **fields)

    def _record(self, kind, start, end, **fields) -> None:
        self._pending.append((kind, start, end, fields, self.ledger.step))

    def flush(self) -> None:
        """Put the copies' device times into the ledger (waits for the copies recorded so far)."""
        pending, self._pending = self._pending, []
        for kind, start, end, fields, step in pending:
            self.ledger.add(kind, self.clock.time(start), self.clock.time(end), step=step, **fields)
        self._keep = [(e, o) for e, o in self._keep if not e.done]


class OffloadedCheckpoints:
    """Where ``activation_checkpointing.cpu_checkpointing`` keeps the checkpointed blocks' inputs (ZeRO-Infinity
    §5.1.2): copied device -> host on the copy stream into pinned buffers charged to the host budget, and back
    just before recomputation (the store/load/release protocol of refimpl/activation_checkpointing.py).

    store() waits for its copy, so the caller may drop the device array at once (DeepSpeed's
    ``synchronize_checkpoint_boundary``); load()'s copy runs on the copy stream and the compute stream waits for
    it. Counters: bytes_stored / bytes_loaded (traffic, cumulative) and resident_bytes (held now)."""

    def __init__(self, copies: CopyStream):
        self.copies, self.budget = copies, copies.ledger.budget
        self._held: dict[int, np.ndarray] = {}     # handle -> the host copy
        self._ids = itertools.count()
        self.bytes_stored = self.bytes_loaded = 0

    @property
    def resident_bytes(self) -> int:
        return sum(buf.nbytes for buf in self._held.values())

    def store(self, array) -> int:
        self.budget.alloc("host", array.nbytes, "an offloaded activation checkpoint (cpu_checkpointing)")
        buf = self.copies.host_empty(array.nbytes).view(array.dtype).reshape(array.shape)
        self.copies.to_host(array, buf, "activation checkpoint").wait()
        handle = next(self._ids)
        self._held[handle] = buf
        self.bytes_stored += buf.nbytes
        return handle

    def load(self, handle):
        if handle not in self._held:
            raise ValueError(f"no checkpoint stored under handle {handle!r} (each one can be loaded once); "
                             f"stored: {sorted(self._held)}")
        buf = self._held.pop(handle)
        dev = self.copies.to_device(buf, "activation checkpoint")     # the copy keeps buf until it is done
        self.budget.free("host", buf.nbytes)
        self.bytes_loaded += buf.nbytes
        return dev

    def release(self, array) -> None:
        """Every reader of a loaded array is queued (the recomputation's backward): see CopyStream.release."""
        self.copies.release(array)


def _bytes(a):
    """A contiguous array as flat bytes (copies need no dtype: bfloat16 is spelled differently by numpy and CuPy)."""
    return a.reshape(-1).view(np.uint8)
