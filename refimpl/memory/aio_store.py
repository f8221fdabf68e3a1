"""The fast NVMe tier (AioStore): swap files read and written in aligned blocks by a pool of I/O threads.

ZeRO-Infinity (Rajbhandari et al. 2021, arXiv 2104.07857) §6 "DeepNVMe" keeps the NVMe tier near the disk's peak
bandwidth with bulk asynchronous reads and writes: each transfer is split into many requests, many requests are in
flight at once, buffers are aligned and I/O bypasses the page cache (O_DIRECT). The knobs are DeepSpeed's ``aio``
config section: ``block_size`` (bytes per request), ``queue_depth`` (requests in flight per I/O thread) and
``intra_op_parallelism`` (I/O threads; old name ``thread_count``). ``single_submit``, ``overlap_events`` and
``use_gds`` tune libaio and GPUDirect Storage, which this module doesn't use: they are accepted and ignored.

How DeepNVMe's ideas map onto plain Python:
- A request is one ``block_size`` slice of the array at file offset ``i * block_size``.
- DeepNVMe submits ``queue_depth`` requests per thread through Linux AIO. Python has no portable async file API, so
  here a request in flight is a worker thread blocked in ``os.pwrite``/``os.preadv`` (they release the GIL): the
  pool has ``intra_op_parallelism * queue_depth`` workers, the number of requests the disk sees at once. Each
  worker loops over a transfer's requests (one pool task per worker, not per request: less Python per block).
- O_DIRECT wants the buffer address, file offset and length to be multiples of 4096, so each worker owns one aligned
  bounce buffer: array bytes are copied through it and the last partial block is padded (files are preallocated to a
  multiple of 4096). Arrays in aligned memory (``aligned_empty``; DeepSpeed's pinned, aligned swap buffers) skip the
  copy for their full blocks. Without O_DIRECT (``direct=False``, or ``direct=None`` on a filesystem that refuses it)
  requests read and write the array's memory directly.
- Checksums are zlib.crc32, computed at write time by each request for its own block (zlib releases the GIL, so
  they run on every core, between the requests the disk is busy with) and combined in block order when the write
  completes (``crc32_combine``); reads do the same and the handle's ``wait()`` raises SwapError on a mismatch. One
  crc32 over the whole array would be a serial ~0.3 s per GiB at ~4 GB/s on one core, as long as the disk transfer
  itself here. crc32 catches what a swap file suffers from (bit rot, truncation, a stale or overwritten file), not
  tampering.

Swap files are never fsynced: they are scratch, rewritten every step (refimpl/memory/swap_files.py). Operations
on different keys overlap freely; the caller orders operations on one key (wait before reading it).
The readable reference for the same tier is MmapStore (refimpl/memory/mmap_store.py); ``aio.engine`` picks one.
"""
import collections
import contextlib
import errno
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

from .crc32 import combine_blocks
from .store import ALIGN, aligned_empty, round_up
from .swap_files import FileStore, SwapError


class IOHandle:
    """One asynchronous read or write. ``wait()`` blocks until all its requests finished and re-raises the first
    failure; ``start``/``end`` (perf_counter seconds) and ``nbytes`` are what a ledger records."""

    def __init__(self, op, key, nbytes, requests, n_workers, finish):
        self.op, self.key, self.nbytes = op, key, nbytes
        self.start, self.end, self.error = time.perf_counter(), None, None
        self._requests = collections.deque(requests)     # (fn, *args) not yet started; workers pop them
        self._left, self._finish = n_workers, finish
        self._lock, self._event = threading.Lock(), threading.Event()

    def _drain(self):                   # one I/O worker; every worker ends here, so a failure can never hang wait()
        try:
            while self.error is None:   # after one request failed, skip the rest
                try:
                    fn, *args = self._requests.popleft()    # atomic: the workers share the deque without a lock
                except IndexError:
                    break
                fn(*args)
        except BaseException as exc:   # noqa: BLE001 -- handed to wait()
            with self._lock:
                self.error = self.error or exc
        finally:
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                try:
                    self._finish(self)
                finally:
                    self.end = time.perf_counter()
                    self._event.set()

    def done(self):
        return self._event.is_set()

    def wait(self, timeout=None):
        if not self._event.wait(timeout):
            raise TimeoutError(f"{self.op} of {self.key!r} still in flight after {timeout} s")
        if self.error is not None:
            raise self.error


class AioStore(FileStore):
    """A swap folder (DeepSpeed's ``swap_folder``) read and written by ``queue_depth * intra_op_parallelism``
    I/O threads in ``block_size`` requests, with O_DIRECT where the filesystem allows it."""

    def __init__(self, path, *, block_size=1 << 20, queue_depth=8, intra_op_parallelism=1, direct=None,
                 single_submit=False, overlap_events=True, use_gds=False):
        for name, value in (("block_size", block_size), ("queue_depth", queue_depth),
                            ("intra_op_parallelism", intra_op_parallelism)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"aio.{name}={value!r}: must be a positive integer")
        if block_size % ALIGN:
            raise ValueError(f"aio.block_size={block_size}: must be a multiple of {ALIGN} (the O_DIRECT alignment)")
        super().__init__(path)
        self.block_size, self.queue_depth, self.intra_op_parallelism = block_size, queue_depth, intra_op_parallelism
        try:
            self.direct = self._probe(direct)
        except BaseException:
            self._dirlock.release()
            raise
        self._local = threading.local()                      # each worker's bounce buffer
        self._pool = ThreadPoolExecutor(intra_op_parallelism * queue_depth, thread_name_prefix="nvme-aio")

    def _probe(self, direct):
        """Check the folder is writable (os.access lies to root) and whether its filesystem accepts O_DIRECT."""
        probe = os.path.join(self.path, f".probe-{os.getpid()}-{id(self)}")
        with self._oserrors(self.path, what=f"swap folder {self.path} is not writable"):
            os.close(os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))
        refused = None if hasattr(os, "O_DIRECT") else "this OS has no O_DIRECT"
        try:
            if direct is not False and refused is None:
                block = aligned_empty(ALIGN)
                block[:] = 0
                fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
                try:
                    os.pwrite(fd, block, 0)
                finally:
                    os.close(fd)
        except OSError as exc:                          # tmpfs before Linux 6.6: EINVAL at open
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise SwapError(f"cannot probe swap folder {self.path}: {exc.strerror}", self.path, exc.errno) from exc
            refused = exc.strerror
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
        if refused and direct:
            raise SwapError(f"direct=True but the filesystem of swap folder {self.path} refuses O_DIRECT ({refused}); "
                            "use direct=None to fall back to buffered I/O", self.path, errno.EINVAL)
        return direct is not False and refused is None

    # -- helpers -------------------------------------------------------------------------------------------------
    def _open(self, file, flags):
        with self._oserrors(file):
            return os.open(file, flags | (os.O_DIRECT if self.direct else 0))

    def _bounce(self):
        if getattr(self._local, "buf", None) is None:
            self._local.buf = aligned_empty(self.block_size)
        return self._local.buf

    def _bounces(self, array, off, n):
        """O_DIRECT can't use the array's own memory unless its address and the length are aligned too."""
        return self.direct and ((array.ctypes.data + off) % ALIGN or n % ALIGN)

    def _submit(self, op, key, nbytes, fd, tasks, on_success):
        def finish(handle):                             # on the I/O thread that ran the last task
            with contextlib.suppress(OSError):
                os.close(fd)
            if handle.error is None:
                try:
                    on_success()
                except SwapError as exc:                # a checksum mismatch: wait() raises it
                    handle.error = exc
            self._account(op, -1, nbytes if handle.error is None else 0)

        # Each of up to queue_depth * intra_op_parallelism workers loops over the handle's requests: one pool task
        # per worker rather than per request spares a future, a queue hand-off and a thread wake-up per block.
        n_workers = max(1, min(len(tasks), self.intra_op_parallelism * self.queue_depth))
        handle = IOHandle(op, key, nbytes, tasks, n_workers, finish)
        self._account(op, +1)
        for _ in range(n_workers):
            self._pool.submit(handle._drain)
        return handle

    # -- the Store interface ---------------------------------------------------------------------------------------
    def write(self, key, array):
        """Start writing ``array`` to the swap file of ``key`` (allocated here if it isn't, or is too small).
        Each request checksums its own block; the handle records the combined crc32 when the last one is done."""
        src, entry = self._writable(key, array)         # (nbytes,) uint8
        file = self.file(key)
        fd = self._open(file, os.O_WRONLY)
        offsets = range(0, src.nbytes, self.block_size)
        crcs = [0] * len(offsets)                       # each request's crc32 of its block, combined at the end

        def checksum():
            entry.update(checksum=combine_blocks(crcs, src.nbytes, self.block_size))
        tasks = [(self._write_block, fd, file, src, i, off, crcs) for i, off in enumerate(offsets)]
        return self._submit("write", key, src.nbytes, fd, tasks, checksum)

    def _write_block(self, fd, file, src, i, off, crcs):
        n = min(self.block_size, src.nbytes - off)
        data = src[off:off + n]
        crcs[i] = zlib.crc32(data)
        if self._bounces(src, off, n):                  # copy through this worker's aligned buffer, pad the tail
            data, padded = self._bounce(), round_up(n)
            data[:n] = src[off:off + n]
            data[n:padded] = 0
            data = data[:padded]
        view, done = memoryview(data), 0
        with self._oserrors(file, need=round_up(src.nbytes)):
            while done < len(view):                     # a regular file rarely writes short, but it may
                wrote = os.pwrite(fd, view[done:], off + done)
                if wrote == 0:
                    raise OSError(errno.EIO, f"pwrite wrote 0 bytes at offset {off + done}")
                done += wrote

    def read(self, key, out):
        """Start reading the swap file of ``key`` into ``out`` (C-contiguous, the same nbytes as the last write).
        Each request checksums its own block as it lands and the handle's ``wait()`` raises SwapError when the
        combined crc32 differs from the one recorded at write time (no serial pass after the read)."""
        self._check_open()
        file = self.file(key)
        fd = self._open(file, os.O_RDONLY)
        try:
            dst, entry = self._readable(key, out, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        offsets = range(0, dst.nbytes, self.block_size)
        crcs, want = [0] * len(offsets), entry["checksum"]

        def check():
            self._check(key, combine_blocks(crcs, dst.nbytes, self.block_size), want)
        tasks = [(self._read_block, fd, file, dst, i, off, crcs) for i, off in enumerate(offsets)]
        return self._submit("read", key, dst.nbytes, fd, tasks, check)

    def _read_block(self, fd, file, dst, i, off, crcs):
        n = min(self.block_size, dst.nbytes - off)
        # O_DIRECT: read the aligned length into this worker's aligned buffer, then copy only the n bytes we want
        bounce = self._bounces(dst, off, n)
        buf = self._bounce()[:round_up(n)] if bounce else dst[off:off + n]
        view, got = memoryview(buf), 0
        with self._oserrors(file):
            while got < n:
                r = os.preadv(fd, [view[got:]], off + got)
                if r == 0:
                    raise SwapError(f"short read from swap file {file}: {got} of {n} bytes at offset {off}",
                                    file, errno.EIO)
                got += r
        if bounce:
            dst[off:off + n] = buf[:n]
        crcs[i] = zlib.crc32(dst[off:off + n])

    def close(self):
        """Wait for I/O in flight, stop the threads and release the swap folder."""
        if not self._closed:
            self._pool.shutdown(wait=True)
            super().close()
