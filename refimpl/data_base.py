"""What every dataset module shares: the Batch, the errors, the seeded streams, argument checks, and reading the
standard-library sources (refimpl/data.py's contract: a batch is a pure function of (seed, split, step, batch size)).
"""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset was asked for something it cannot provide (bad path, bad size, unknown name)."""


@dataclass(frozen=True)
class Batch:
    """One batch. LM batches fill ``targets``; classification batches fill ``labels`` and the mask."""

    ids: np.ndarray                       # (B, T) int64 token ids
    targets: np.ndarray | None            # (B, T) int64, next-token targets (LM)
    labels: np.ndarray | None             # (B,) int64, class labels (classification)
    key_padding_mask: np.ndarray | None   # (B, T) bool, True = padding (PyTorch's convention)


# Fixed small integers that name each random stream. They go into the SeedSequence spawn key, so a
# stream is identified by (seed, domain, split, index) and no two uses of the seed share a stream.
_SPLITS = {"train": 0, "val": 1}


def _rng(seed: int, domain: int, split: str, index: int) -> np.random.Generator:
    # The seed is the entropy (padded by NumPy to a full pool before the spawn key is appended), and the
    # spawn key has fixed-width leading words, so distinct (seed, domain, split, index) never collide.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(domain, _SPLITS[split], index)))


def _check_int(name: str, value, minimum: int) -> int:
    try:
        if isinstance(value, bool):  # True is an int to Python, but never a meaningful size or seed
            raise TypeError
        value = operator.index(value)  # accepts int and NumPy integers, refuses floats and strings
    except TypeError:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _check_val_fraction(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {value!r}")


def _check_batch_args(split, step, batch_size, seq_len) -> tuple[int, int, int]:
    if split not in _SPLITS:
        raise DataError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return (_check_int("step", step, 0), _check_int("batch_size", batch_size, 1),
            _check_int("seq_len", seq_len, 1))


# Directory names pruned anywhere in the tree: installed third-party code, the (huge, repetitive) test
# suites, IDLE, and build-configuration directories such as config-3.11-x86_64-linux-gnu.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
# _sysconfigdata_*.py records the build machine's paths and flags; it differs between two installs of the
# same Python version, so it would make the corpus machine-dependent.
_SKIP_FILE_PREFIXES = ("_sysconfigdata",)


def _candidate_files(root: Path) -> list[str]:
    """All *.py files under root as relative POSIX paths, sorted (independent of listing order)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk does not descend into skipped subtrees.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_SKIP_FILE_PREFIXES):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def _read_source(path: Path) -> bytes | None:
    """The file's bytes if it is readable UTF-8 text, else None (skipped)."""
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return data
