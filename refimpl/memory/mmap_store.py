"""The reference NVMe tier: each swap file is a ``numpy.memmap`` (ZeRO-Infinity §5, infinity offload engine).

To the program, a memory-mapped file is an array: reading a key is a slice copy out of the map (the kernel pages
the file in), writing is a slice assignment into it plus a flush (msync: the dirty pages go to the disk before
the write's handle is returned). That is all an offload tier has to do, and it can be checked line by line.

What it gives up against the fast path (AioStore, refimpl/memory/aio_store.py; numbers in BENCHMARKS.md):
transfers are synchronous, on the caller's thread, so nothing overlaps them; every byte passes through the page
cache (a read is served from it when the file was touched recently, a write is copied into it and then flushed
page by page), where DeepNVMe's O_DIRECT requests go straight between the disk and aligned buffers, many at once.
Reads are verified against the crc32 of the last write, as in AioStore (one serial pass each way here).
"""
from __future__ import annotations

import os
import time

import numpy as np

from .crc32 import crc32_of
from .store import DoneHandle
from .swap_files import FileStore


class MmapStore(FileStore):
    """A swap folder whose files are read and written through ``numpy.memmap``; every transfer is synchronous."""

    def _map(self, key):
        """The key's whole swap file as a uint8 array (the mapping lives until the array is dropped)."""
        file, capacity = self.file(key), self.manifest[key]["capacity"]
        with self._oserrors(file, need=capacity):
            size = os.stat(file).st_size
            if size < capacity:                         # mapping past the end would SIGBUS on first touch
                raise OSError(5, f"{size} bytes on disk, {capacity} allocated (truncated?)")
            return np.memmap(file, dtype=np.uint8, mode="r+", shape=(capacity,))

    def write(self, key, array):
        src, entry = self._writable(key, array)
        start = time.perf_counter()
        self._account("write", +1)
        try:
            if src.nbytes:                              # (numpy cannot map an empty file)
                swap = self._map(key)
                with self._oserrors(self.file(key), need=entry["capacity"]):
                    swap[:src.nbytes] = src             # into the page cache ...
                    swap.flush()                        # ... and out to the disk
                del swap
            entry.update(checksum=crc32_of(src))
        finally:
            self._account("write", -1, src.nbytes if entry["checksum"] else 0)
        return DoneHandle("write", key, src.nbytes, start)

    def read(self, key, out):
        self._check_open()
        file, start = self.file(key), time.perf_counter()
        with self._oserrors(file):
            size = os.stat(file).st_size
        dst, entry = self._readable(key, out, size)
        self._account("read", +1)
        try:
            if dst.nbytes:
                swap = self._map(key)
                dst[...] = swap[:dst.nbytes]            # the kernel pages the file in as the copy touches it
                del swap
            self._check(key, crc32_of(dst), entry["checksum"])
        finally:
            self._account("read", -1, dst.nbytes)
        return DoneHandle("read", key, dst.nbytes, start)
