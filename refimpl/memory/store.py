"""Memory tiers as stores: one small interface, three interchangeable implementations.

ZeRO-Infinity (Rajbhandari et al. 2021, arXiv 2104.07857) §5, the infinity offload engine: model states move
between GPU, CPU and NVMe memory through one mechanism, and which tier holds a partition is a setting, not a
different program. Here a tier is a *store* of named byte arrays ("keys": one parameter chunk, one optimizer
sub-group's master weights, ...) that moves them in and out of host memory:

    allocate(key, nbytes)   reserve room for the key (a disk store preallocates its file: later writes can't run
                            out of space)
    write(key, array)       start copying the array's bytes in; returns a handle
    read(key, out)          start copying the key's bytes into the host array ``out``; returns a handle
    free(key), close()

A handle's ``wait()`` blocks until the bytes have moved and re-raises what went wrong; ``done()`` asks without
blocking; ``start``, ``end`` (perf_counter seconds) and ``nbytes`` are what the ledger records. Operations on
different keys may overlap; the caller orders operations on one key (waits for a write before reading it).

    HostStore   host RAM (pinned behind a GPU backend)           offload_*.device = "cpu"
    MmapStore   numpy.memmap swap files: the readable reference  offload_*.device = "nvme", aio.engine = "mmap"
    AioStore    O_DIRECT block I/O on a pool of I/O threads       offload_*.device = "nvme", aio.engine = "aio"
                (DeepNVMe, §6: the fast path, and the default)

refimpl/memory/tiers.py builds the store an offload config asks for. A HostStore's bytes are host memory already
(``resident``): ``view(key)`` hands out the stored array itself, so
the offloaded optimizer steps it in place and nothing is read ahead; reading or writing a key through its own
view moves nothing. The swappers (param_offload.py, optimizer_offload.py) are written once against this interface.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

ALIGN = 4096            # O_DIRECT alignment of buffer address, file offset and length; swap files are padded to it


def round_up(n, align=ALIGN):
    return -(-n // align) * align


def aligned_empty(nbytes, align=ALIGN, empty=np.empty):
    """An uninitialised uint8 array of ``nbytes`` whose data address is a multiple of ``align`` (O_DIRECT needs it).
    ``empty(n, dtype)`` allocates the memory (pinned memory for copies to a GPU: refimpl/memory/transfer.py)."""
    raw = empty(nbytes + align, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip:skip + nbytes]


def byte_view(array, writable=False):
    """The array's memory as a flat uint8 array (nbytes,); a copy only for a non-contiguous source of a write."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(array).__name__}")
    if writable and not (array.flags.c_contiguous and array.flags.writeable):
        raise ValueError("read() needs a C-contiguous, writeable output array")
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def check_allocation(key, nbytes):
    if not isinstance(key, str) or not key:
        raise ValueError(f"swap key {key!r}: must be a non-empty string")
    if not isinstance(nbytes, (int, np.integer)) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"nbytes={nbytes!r}: must be a non-negative integer")


class DoneHandle:
    """A transfer that finished before its handle was returned (the synchronous stores)."""

    def __init__(self, op, key, nbytes, start):
        self.op, self.key, self.nbytes = op, key, nbytes
        self.start, self.end = start, time.perf_counter()

    def done(self):
        return True

    def wait(self, timeout=None):
        return None


class Store(ABC):
    """A tier of named byte arrays. ``tier`` is the ledger's name for it ("host" or "nvme")."""

    tier: str
    resident = False    # True: the bytes live in this process's memory and view(key) hands them out

    @abstractmethod
    def allocate(self, key: str, nbytes: int) -> None: ...

    @abstractmethod
    def write(self, key: str, array):
        """Start writing ``array`` (allocating the key if needed); don't modify the array until the handle is done."""

    @abstractmethod
    def read(self, key: str, out):
        """Start reading the key into ``out`` (C-contiguous, the nbytes of the last write)."""

    @abstractmethod
    def free(self, key: str) -> None: ...

    def view(self, key: str) -> np.ndarray:
        """The stored bytes themselves (uint8, the key's allocation); only a resident store has them."""
        raise TypeError(f"{type(self).__name__} keeps its bytes outside this process's memory: read() them")

    def close(self) -> None:
        """Stop I/O threads and release files (the run is over)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HostStore(Store):
    """The host tier: one host array per key, from ``empty(nbytes)`` (4096-aligned, pinned behind a GPU backend)."""

    tier, resident = "host", True

    def __init__(self, empty=aligned_empty):
        self._empty = empty
        self._arrays: dict[str, np.ndarray] = {}   # key -> its allocation (uint8)
        self._nbytes: dict[str, int] = {}          # key -> bytes of its last write

    def allocate(self, key, nbytes):
        check_allocation(key, nbytes)
        array = self._empty(int(nbytes))
        array[...] = 0
        self._arrays[key] = array

    def allocate_contiguous(self, sizes) -> np.ndarray:
        """Allocate the keys of ``sizes`` ((key, nbytes) pairs) as consecutive views of one array, and return it
        (uint8): a partition whose chunks are keys can then also be used whole (one kernel call, not one per key)."""
        for key, nbytes in sizes:
            check_allocation(key, nbytes)
        arena = self._empty(sum(int(n) for _, n in sizes))
        arena[...] = 0
        pos = 0
        for key, nbytes in sizes:
            self._arrays[key] = arena[pos:pos + int(nbytes)]
            pos += int(nbytes)
        return arena

    def _array(self, key):
        if key not in self._arrays:
            raise ValueError(f"no host array for key {key!r} ({len(self._arrays)} keys allocated)")
        return self._arrays[key]

    def view(self, key):
        return self._array(key)

    def write(self, key, array):
        src, start = byte_view(array), time.perf_counter()
        if key not in self._arrays or self._arrays[key].nbytes < src.nbytes:
            self.allocate(key, src.nbytes)
        dst = self._arrays[key][:src.nbytes]
        moved = _copy(dst, src)
        self._nbytes[key] = src.nbytes
        return DoneHandle("write", key, moved, start)

    def read(self, key, out):
        dst, start = byte_view(out, writable=True), time.perf_counter()
        src = self._array(key)
        if key not in self._nbytes:
            raise ValueError(f"host key {key!r} holds no completed write")
        if dst.nbytes != self._nbytes[key]:
            raise ValueError(f"read of {key!r}: out has {dst.nbytes} bytes, the host array holds {self._nbytes[key]}")
        return DoneHandle("read", key, _copy(dst, src[:dst.nbytes]), start)

    def free(self, key):
        self._array(key)
        del self._arrays[key]
        self._nbytes.pop(key, None)


def _copy(dst, src) -> int:
    """Copy unless dst and src are the same memory (a key written or read through its own view): bytes moved."""
    if dst.ctypes.data == src.ctypes.data:
        return 0
    dst[...] = src
    return src.nbytes
