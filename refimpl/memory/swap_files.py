"""A swap folder: what the two NVMe stores share (refimpl/memory/mmap_store.py, refimpl/memory/aio_store.py).

One preallocated file per key in a folder of its own (DeepSpeed's ``swap_folder``, mode 0700, locked against a
second run), an in-memory manifest (key -> file, capacity, bytes of the last write, its crc32), I/O statistics, and
errors that name the swap file and what went wrong (a full disk, a vanished folder, a truncated or changed file).

Swap files are scratch: rewritten every step, never fsynced, not part of a checkpoint (checkpoints copy the
partitions out: refimpl/checkpoint.py). A crash loses them with the training state held in memory.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import threading
import time
import zlib
from dataclasses import dataclass

from ..lock import DirLock
from .store import Store, byte_view, check_allocation, round_up


class SwapError(OSError):
    """An NVMe-tier failure. ``.filename`` is the swap file or folder; the message says what went wrong."""

    def __init__(self, message, filename, err=None):
        super().__init__(message)
        self.errno, self.strerror, self.filename = err, message, os.fspath(filename)

    def __str__(self):                  # just the message (OSError's own would print "[Errno n] ...: 'file'")
        return self.strerror


@dataclass
class IOStats:
    """Bytes moved and seconds during which at least one read (write) was in flight: bytes / seconds = bandwidth."""
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0


class FileStore(Store):
    """The NVMe tier's bookkeeping: a folder of preallocated swap files, one per key."""

    tier = "nvme"

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise SwapError(f"swap folder {self.path} exists and is not a directory", self.path, errno.ENOTDIR)
        with self._oserrors(self.path, what=f"cannot create swap folder {self.path}"):
            if not os.path.isdir(self.path):
                os.makedirs(self.path, mode=0o700)
                os.chmod(self.path, 0o700)                   # makedirs' mode is filtered by the umask
        self._dirlock = DirLock(self.path, "a swap folder")   # before anything in it is read or written
        self.manifest: dict[str, dict] = {}   # key -> {file, capacity, nbytes, checksum}
        self.stats = IOStats()
        self._lock = threading.Lock()
        self._busy = {"read": [0, 0.0], "write": [0, 0.0]}   # handles in flight, since when that count is nonzero
        self._closed = False

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

    def file(self, key) -> str:
        """The path of the key's swap file."""
        if key not in self.manifest:
            raise ValueError(f"no swap file for key {key!r} in {self.path} ({len(self.manifest)} keys allocated)")
        return os.path.join(self.path, self.manifest[key]["file"])

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

    def _check_open(self):
        if self._closed:
            raise ValueError(f"{type(self).__name__}({self.path!r}) is closed")

    # -- the Store interface ---------------------------------------------------------------------------------------
    def allocate(self, key, nbytes):
        """Preallocate the swap file of ``key``: ``nbytes`` rounded up to 4096 (later writes can't run out of space)."""
        check_allocation(key, nbytes)
        self._check_open()
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
            entry = self.manifest.setdefault(key, {"nbytes": 0, "checksum": None})
            entry.update(file=name + ".swp", capacity=size)

    def _writable(self, key, array):
        """The bytes to write and the key's manifest entry (allocated or grown first); the old checksum is void."""
        src = byte_view(array)
        if key not in self.manifest or self.manifest[key]["capacity"] < src.nbytes:
            self.allocate(key, src.nbytes)
        self._check_open()
        entry = self.manifest[key]
        entry.update(nbytes=src.nbytes, checksum=None)
        return src, entry

    def _readable(self, key, out, size):
        """Check a read of ``key`` into ``out`` can succeed: a completed write of the same size, and the file (of
        ``size`` bytes on disk) not truncated below it: reading past its end would be a short read, or SIGBUS
        through a memory map."""
        file, entry = self.file(key), self.manifest[key]
        dst = byte_view(out, writable=True)
        if entry["checksum"] is None:
            raise SwapError(f"swap file {file} holds no completed write of {key!r}", file)
        if dst.nbytes != entry["nbytes"]:
            raise ValueError(f"read of {key!r}: out has {dst.nbytes} bytes, the swap file holds {entry['nbytes']}")
        need = round_up(entry["nbytes"])
        if size < need:
            raise SwapError(f"swap file {file} is truncated: {size} bytes on disk, but the manifest says "
                            f"{entry['nbytes']} bytes ({need} with alignment padding)", file, errno.EIO)
        return dst, entry

    def _check(self, key, got, want):
        if got != want:
            raise SwapError(f"swap file {self.file(key)} is corrupt or was changed since it was written "
                            f"(read {got}, manifest says {want})", self.file(key), errno.EIO)

    def free(self, key):
        """Delete the swap file of ``key`` and forget it."""
        file = self.file(key)
        with self._lock:
            del self.manifest[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file)

    def close(self):
        if not self._closed:
            self._closed = True
            self._dirlock.release()
