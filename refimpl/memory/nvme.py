"""The NVMe tier: a directory of preallocated swap files, read and written in aligned blocks by a pool of I/O threads.

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

fsync policy: write handles don't fsync. Swap contents are scratch rewritten every step, and a crash loses the
training state held in memory anyway. ``flush()`` fsyncs every swap file and the folder (call it before you record
a checkpoint that points at swap files); ``save_manifest()`` fsyncs the manifest and renames it into place.
Operations on different keys overlap freely; the caller orders operations on one key (wait before reading it).
"""
import collections
import contextlib
import errno
import functools
import json
import os
import re
import shutil
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ml_dtypes  # noqa: F401  -- registers "bfloat16" with numpy, so manifest dtypes resolve by name
import numpy as np

from ..lock import DirLock

ALIGN = 4096            # O_DIRECT alignment of buffer address, file offset and length
MANIFEST = "manifest.json"


class SwapError(OSError):
    """An NVMe-tier failure. ``.filename`` is the swap file or folder; the message says what went wrong."""

    def __init__(self, message, filename, err=None):
        super().__init__(message)
        self.errno, self.strerror, self.filename = err, message, os.fspath(filename)

    def __str__(self):                  # just the message (OSError's own would print "[Errno n] ...: 'file'")
        return self.strerror


def round_up(n, align=ALIGN):
    return -(-n // align) * align


def aligned_empty(nbytes, align=ALIGN, empty=np.empty):
    """An uninitialised uint8 array of ``nbytes`` whose data address is a multiple of ``align`` (O_DIRECT needs it).
    `empty(n, dtype)` allocates the memory (pinned memory for copies to a GPU: refimpl/memory/transfer.py)."""
    raw = empty(nbytes + align, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip:skip + nbytes]


@dataclass
class IOStats:
    """Bytes moved and seconds during which at least one read (write) was in flight: bytes / seconds = bandwidth."""
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0


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


def _gf2_times(matrix, vector):
    """A 32x32 matrix over GF(2) (``matrix[i]`` is column i, as a 32-bit int) times a 32-bit vector."""
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector, i = vector >> 1, i + 1
    return out


@functools.lru_cache(maxsize=64)
def _crc32_shift(nbytes):
    """The GF(2) operator that feeds ``nbytes`` zero bytes through crc32's register (zlib's crc32_combine trick),
    built by repeated squaring; a write has at most two block lengths (block_size and its tail), so it's cached."""
    one_bit = [0xEDB88320] + [1 << i for i in range(31)]           # crc32's reversed polynomial: one zero bit
    power = one_bit
    for _ in range(3):                                              # 2, 4, 8 zero bits: one zero byte
        power = [_gf2_times(power, column) for column in power]
    shift = [1 << i for i in range(32)]                             # the identity
    while nbytes:
        if nbytes & 1:
            shift = [_gf2_times(power, column) for column in shift]
        power = [_gf2_times(power, column) for column in power]
        nbytes >>= 1
    return tuple(shift)


def crc32_combine(crc1, crc2, len2):
    """zlib.crc32(a + b) from crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and len2 = len(b) (zlib's crc32_combine,
    which Python's zlib module doesn't expose)."""
    return _gf2_times(_crc32_shift(len2), crc1) ^ crc2


def _byte_view(array, writable=False):
    """The array's memory as a flat uint8 array (nbytes,); a copy only for a non-contiguous source of a write."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(array).__name__}")
    if writable and not (array.flags.c_contiguous and array.flags.writeable):
        raise ValueError("read() needs a C-contiguous, writeable output array")
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


class NVMeStore:
    """A directory of preallocated swap files, one per named array (DeepSpeed's ``swap_folder``)."""

    def __init__(self, path, *, block_size=1 << 20, queue_depth=8, intra_op_parallelism=1, direct=None,
                 single_submit=False, overlap_events=True, use_gds=False):
        for name, value in (("block_size", block_size), ("queue_depth", queue_depth),
                            ("intra_op_parallelism", intra_op_parallelism)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"aio.{name}={value!r}: must be a positive integer")
        if block_size % ALIGN:
            raise ValueError(f"aio.block_size={block_size}: must be a multiple of {ALIGN} (the O_DIRECT alignment)")
        self.path = os.path.abspath(os.fspath(path))
        self.block_size, self.queue_depth, self.intra_op_parallelism = block_size, queue_depth, intra_op_parallelism
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise SwapError(f"swap folder {self.path} exists and is not a directory", self.path, errno.ENOTDIR)
        with self._oserrors(self.path, what=f"cannot create swap folder {self.path}"):
            if not os.path.isdir(self.path):
                os.makedirs(self.path, mode=0o700)
                os.chmod(self.path, 0o700)                   # makedirs' mode is filtered by the umask
        self._dirlock = DirLock(self.path, "a swap folder")   # before anything in it is read or written
        self.direct = self._probe(direct)
        self.manifest = self._load_manifest()   # key -> {file, capacity, nbytes, dtype, shape, checksum}
        self.stats = IOStats()
        self._lock = threading.Lock()
        self._busy = {"read": [0, 0.0], "write": [0, 0.0]}   # handles in flight, since when that count is nonzero
        self._local = threading.local()                      # each worker's bounce buffer
        self._pool = ThreadPoolExecutor(intra_op_parallelism * queue_depth, thread_name_prefix="nvme-aio")
        self._closed = False

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

    def _load_manifest(self):
        file = os.path.join(self.path, MANIFEST)
        if not os.path.exists(file):
            return {}
        try:
            with open(file) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise SwapError(f"cannot read swap manifest {file}: {exc}", file) from exc
        if not isinstance(manifest, dict):
            raise SwapError(f"swap manifest {file} is not a JSON object", file)
        return manifest

    # -- helpers -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _oserrors(self, file, need=None, what=None):
        """Turn an OSError from a syscall on ``file`` into a SwapError that says which file and why."""
        try:
            yield
        except SwapError:
            raise
        except OSError as exc:
            if what:
                msg = f"{what}: {exc.strerror or exc}"
            elif exc.errno == errno.ENOSPC:
                with contextlib.suppress(OSError):
                    need = f"{need} bytes, {shutil.disk_usage(self.path).free} bytes available"
                msg = f"no space left for swap file {file}: needs {need} in {self.path}"
            elif exc.errno == errno.ENOENT and not os.path.isdir(self.path):
                msg = f"swap folder {self.path} has vanished (needed for swap file {file})"
            elif exc.errno == errno.ENOENT:
                msg = f"swap file {file} is missing (deleted since it was allocated?)"
            else:
                msg = f"I/O error on swap file {file}: {exc.strerror or exc}"
            raise SwapError(msg, file, exc.errno) from exc

    def _file(self, key):
        if key not in self.manifest:
            raise ValueError(f"no swap file for key {key!r} in {self.path} ({len(self.manifest)} keys allocated)")
        return os.path.join(self.path, self.manifest[key]["file"])

    def _open(self, file, flags):
        with self._oserrors(file):
            return os.open(file, flags | (os.O_DIRECT if self.direct else 0))

    def _bounce(self):
        if getattr(self._local, "buf", None) is None:
            self._local.buf = aligned_empty(self.block_size)
        return self._local.buf

    def _account(self, op, delta, nbytes=0):
        """Count handles in flight per op; bytes and busy seconds go into ``stats`` when the count falls to zero."""
        now = time.perf_counter()
        with self._lock:
            busy = self._busy[op]
            busy[1] = now if busy[0] == 0 else busy[1]
            busy[0] += delta
            if op == "read":
                self.stats.bytes_read += nbytes
            else:
                self.stats.bytes_written += nbytes
            if busy[0] == 0:
                setattr(self.stats, f"{op}_seconds", getattr(self.stats, f"{op}_seconds") + now - busy[1])

    def _submit(self, op, key, nbytes, fd, tasks, on_success):
        if self._closed:
            os.close(fd)
            raise ValueError(f"NVMeStore({self.path!r}) is closed")

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

    # -- the API ---------------------------------------------------------------------------------------------------
    def allocate(self, key, nbytes):
        """Preallocate the swap file of ``key``: ``nbytes`` rounded up to 4096 (later writes can't run out of space)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"swap key {key!r}: must be a non-empty string")
        if not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
            raise ValueError(f"nbytes={nbytes!r}: must be a non-negative integer")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:120]
        name += "" if name == key else f"-{zlib.crc32(key.encode()):08x}"    # keep different keys' files distinct
        file, size = os.path.join(self.path, name + ".swp"), round_up(int(nbytes))
        existed = os.path.exists(file)
        with self._oserrors(file, need=size):
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if size:
                    os.posix_fallocate(fd, 0, size)
            except OSError:
                if not existed:                         # don't leave a half-allocated file behind
                    os.unlink(file)
                raise
            finally:
                os.close(fd)
        with self._lock:
            entry = self.manifest.setdefault(key, {"nbytes": 0, "dtype": None, "shape": None, "checksum": None})
            entry.update(file=name + ".swp", capacity=size)

    def write(self, key, array):
        """Start writing ``array`` to the swap file of ``key`` (allocated here if it isn't, or is too small).
        Don't modify ``array`` until the returned handle's ``wait()`` returns."""
        src = _byte_view(array)                         # (nbytes,) uint8
        if key not in self.manifest or self.manifest[key]["capacity"] < src.nbytes:
            self.allocate(key, src.nbytes)
        entry, file = self.manifest[key], self._file(key)
        fd = self._open(file, os.O_WRONLY)
        entry.update(nbytes=src.nbytes, dtype=str(array.dtype), shape=list(array.shape), checksum=None)
        offsets = range(0, src.nbytes, self.block_size)
        crcs = [0] * len(offsets)                       # each request's crc32 of its block, combined at the end

        def checksum():
            entry.update(checksum=self._combine(offsets, crcs, src.nbytes))
        tasks = [(self._write_block, fd, file, src, i, off, crcs) for i, off in enumerate(offsets)]
        return self._submit("write", key, src.nbytes, fd, tasks, checksum)

    def _bounces(self, array, off, n):
        """O_DIRECT can't use the array's own memory unless its address and the length are aligned too."""
        return self.direct and ((array.ctypes.data + off) % ALIGN or n % ALIGN)

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

    def read(self, key, out, *, verify=True):
        """Start reading the swap file of ``key`` into ``out`` (C-contiguous, the same nbytes as the last write).
        ``verify``: each request checksums its own block as it lands and the handle's ``wait()`` raises SwapError
        when the combined crc32 differs from the one recorded at write time (no serial pass after the read)."""
        file, entry = self._file(key), self.manifest[key]
        dst = _byte_view(out, writable=True)
        if entry["checksum"] is None:
            raise SwapError(f"swap file {file} holds no completed write of {key!r}", file)
        if dst.nbytes != entry["nbytes"]:
            raise ValueError(f"read of {key!r}: out has {dst.nbytes} bytes, the swap file holds {entry['nbytes']}")
        fd = self._open(file, os.O_RDONLY)
        size, need = os.fstat(fd).st_size, round_up(entry["nbytes"])
        if size < need:
            os.close(fd)
            raise SwapError(f"swap file {file} is truncated: {size} bytes on disk, but the manifest says "
                            f"{entry['nbytes']} bytes ({need} with alignment padding)", file, errno.EIO)
        offsets = range(0, dst.nbytes, self.block_size)
        crcs = [0] * len(offsets) if verify else None
        want = entry["checksum"]

        def check():
            if verify:
                self._check(key, self._combine(offsets, crcs, dst.nbytes), want)
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
        if crcs is not None:
            crcs[i] = zlib.crc32(dst[off:off + n])

    def _combine(self, offsets, crcs, nbytes):
        """The per-block crc32s of a transfer, combined in block order: "crc32:xxxxxxxx" of all its bytes."""
        crc = zlib.crc32(b"")
        for off, block_crc in zip(offsets, crcs):
            crc = crc32_combine(crc, block_crc, min(self.block_size, nbytes - off))
        return f"crc32:{crc:08x}"

    def _check(self, key, got, want):
        if got != want:
            raise SwapError(f"swap file {self._file(key)} is corrupt or was changed since it was written "
                            f"(read {got}, manifest says {want})", self._file(key), errno.EIO)

    def write_sync(self, key, array):
        self.write(key, array).wait()

    def read_sync(self, key, out=None, *, verify=True):
        """Read ``key`` (into a new array of the manifest's dtype and shape if ``out`` is None), verified; return it."""
        if out is None:
            self._file(key)                             # unknown key -> ValueError
            out = np.empty(self.manifest[key]["shape"], dtype=np.dtype(self.manifest[key]["dtype"]))
        self.read(key, out, verify=verify).wait()
        return out

    def checksum(self, key):
        """The checksum recorded when ``key`` was last written ("crc32:xxxxxxxx")."""
        file = self._file(key)
        if self.manifest[key]["checksum"] is None:
            raise SwapError(f"swap file {file} holds no completed write of {key!r}", file)
        return self.manifest[key]["checksum"]

    def verify(self, key, array):
        """The bytes of ``array`` must match the checksum recorded when ``key`` was written (reads check this
        themselves; this is for arrays that came another way)."""
        self._check(key, f"crc32:{zlib.crc32(_byte_view(array)):08x}", self.checksum(key))

    def free(self, key):
        """Delete the swap file of ``key`` and forget it."""
        file = self._file(key)
        with self._lock:
            del self.manifest[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file)

    def _fsync(self, file):
        with self._oserrors(file):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def flush(self):
        """fsync every swap file and the folder: completed writes survive a crash (wait for pending ones first)."""
        for key in list(self.manifest):
            self._fsync(self._file(key))
        self._fsync(self.path)

    def save_manifest(self):
        """Write manifest.json atomically: to a temporary name, fsync, rename over the old one, fsync the folder."""
        file = os.path.join(self.path, MANIFEST)
        with self._lock:
            text = json.dumps(self.manifest, indent=1, sort_keys=True)
        with self._oserrors(file):
            with os.fdopen(os.open(file + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(file + ".tmp", file)
        self._fsync(self.path)                          # makes the rename itself durable

    def close(self):
        """Wait for I/O in flight and stop the threads. The manifest is saved only by save_manifest()."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._dirlock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
