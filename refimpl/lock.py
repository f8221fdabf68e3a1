"""One run per directory: an exclusive lock on a run directory and on every swap folder.

Two runs writing one run directory or one swap folder break each other, often silently (each rewrites the other's
swap files and manifest, so every checksum still matches). So a run takes ``fcntl.flock`` on the directory itself
(no lock file is created: the directory's contents stay exactly what the run writes) and a second run fails at
once with "<path> is in use by pid N". The kernel drops the lock when the process ends, kill -9 included, so a
crash never leaves a stale lock behind; the owner's pid is read from /proc/locks.
"""
from __future__ import annotations

import errno
import fcntl
import os


class LockError(RuntimeError):
    """The directory is locked by another run."""


def _owner(path: str) -> str:
    """'pid N' of the process holding a flock on path (from /proc/locks), or 'another process'."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()       # 1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF
                if len(parts) >= 6 and parts[1] == "FLOCK":
                    dev, _, inode = parts[5].rpartition(":")
                    if inode.isdigit() and int(inode) == st.st_ino and os.getpid() != int(parts[4]):
                        return f"pid {parts[4]}"
                    if inode.isdigit() and int(inode) == st.st_ino:
                        return f"this process (pid {parts[4]})"
    except (OSError, ValueError):
        pass
    return "another process"


class DirLock:
    """``DirLock(path, what)`` holds an exclusive lock on directory ``path`` until ``release()`` (or until it is
    garbage-collected, or the process ends). ``what`` names the holder in the error a second run gets."""

    def __init__(self, path, what: str):
        self.path = os.path.abspath(os.fspath(path))
        self._fd = None
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockError(f"{self.path} is in use by {_owner(self.path)} ({what}); two runs must not share it: "
                                f"choose another directory, or wait for that run to end") from None
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)              # closing the descriptor drops the flock

    def __del__(self):
        self.release()
