"""Byte-level text classification from files every Python carries: which standard-library package a snippet of
source comes from.

Brown et al. 2022 ("Wide Attention Is The Way Forward For Transformers?", §4) measure accuracy and CPU latency on
byte-level text classification (IMDb reviews, from the Long Range Arena). IMDb needs a download; this task needs
none and has the same form: a window of raw bytes in, one label out. The classes are eight packages of the
interpreter's standard library, each large (160-490 KB of source in Python 3.11) and present in every Python 3:

    asyncio  email  http  importlib  logging  multiprocessing  unittest  xml

Each package's *.py files (tests skipped, as in the LM corpus) are sorted and joined with b"\\n"; its last
``val_fraction`` is validation, one contiguous tail, so no training window overlaps a validation one. Examples are
``[CLS]`` + ``max_length`` bytes (token = byte + 2; PAD=0, CLS=1), never padded.

- train batch ``s``: B labels drawn uniformly, each with a window at a uniform offset of its package's train part
  (an rng seeded by (seed, "train", s)): an endless stream, balanced in expectation;
- val: ``n_val`` fixed windows, the same number per package at evenly spaced offsets of its tail, the packages
  interleaved (batch i is examples i*B .. (i+1)*B-1, wrapping), so the majority-class baseline is 1/8.

The files differ between Python versions; ``digest`` (sha256 of all the packages' bytes) says which were read.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

from .data_base import (Batch, DataError, _candidate_files, _check_batch_args, _check_int, _check_val_fraction,
                   _read_source, _rng)

PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")
_DOMAIN_SNIPPETS = 3     # refimpl.data's stream numbering: the train windows of one batch


class StdlibPackages:
    """Which of PACKAGES a window of ``max_length`` source bytes comes from (see the module docstring)."""

    PAD, CLS = 0, 1
    vocab_size = 258                  # 256 bytes + PAD + CLS
    n_classes = len(PACKAGES)

    def __init__(self, path: str | os.PathLike | None = None, max_length: int = 256, n_val: int = 400,
                 val_fraction: float = 0.1, max_bytes: int = 4_000_000, seed: int = 0):
        self.seed = _check_int("seed", seed, 0)
        self.max_length = _check_int("max_length", max_length, 1)
        self.n_val = _check_int("n_val", n_val, self.n_classes)
        max_bytes = _check_int("max_bytes", max_bytes, 1)
        _check_val_fraction(val_fraction)
        root = Path(sysconfig.get_paths()["stdlib"] if path is None else path)
        if not root.is_dir():
            raise DataError(f"standard-library path {str(root)!r} is not a directory")
        self.root, digest, self._train, self._val = str(root), hashlib.sha256(), [], []
        for name in PACKAGES:
            pkg = root / name
            files = _candidate_files(pkg) if pkg.is_dir() else []
            parts = [d for d in (_read_source(pkg / rel) for rel in files) if d is not None]
            blob = b"\n".join(parts)[:max_bytes]                  # (max_bytes caps each package)
            n_val_bytes = int(len(blob) * val_fraction)
            if n_val_bytes < self.max_length or len(blob) - n_val_bytes < self.max_length:
                raise DataError(f"package {name!r} under {str(root)!r} has {len(blob)} bytes of source: too few for "
                                f"windows of max_length={self.max_length} in both splits (val_fraction="
                                f"{val_fraction}); the classes are {', '.join(PACKAGES)}")
            digest.update(blob)
            data = np.frombuffer(blob, dtype=np.uint8)
            self._train.append(data[:len(data) - n_val_bytes])
            self._val.append(data[len(data) - n_val_bytes:])
        self.digest = digest.hexdigest()
        per_class = self.n_val // self.n_classes
        labels = np.tile(np.arange(self.n_classes), per_class)     # packages interleaved: balanced prefixes
        offsets = np.empty(labels.size, np.int64)
        for c, val in enumerate(self._val):
            offsets[labels == c] = np.linspace(0, len(val) - self.max_length, per_class).astype(np.int64)
        self._val_ids = np.stack([self._window(self._val[c], o) for c, o in zip(labels, offsets)])
        self._val_labels = labels

    def _window(self, data, offset):
        return np.concatenate([[self.CLS], data[offset:offset + self.max_length].astype(np.int64) + 2])

    def get_batch(self, split: str, step: int, batch_size: int, seq_len: int) -> Batch:
        """Batch ``step`` of ``split`` (for "val" the evaluation batch index); seq_len must be max_length + 1."""
        step, B, T = _check_batch_args(split, step, batch_size, seq_len)
        if T != self.max_length + 1:
            raise DataError(f"seq_len={T} must be max_length + 1 = {self.max_length + 1} (the [CLS] token plus "
                            f"the snippet); set data.seq_len or data.max_length")
        if split == "val":
            idx = (step * B + np.arange(B)) % len(self._val_labels)
            ids, labels = self._val_ids[idx], self._val_labels[idx].copy()
        else:
            rng = _rng(self.seed, _DOMAIN_SNIPPETS, "train", step)
            labels = rng.integers(0, self.n_classes, size=B)
            offsets = [rng.integers(0, len(self._train[c]) - self.max_length + 1) for c in labels]
            ids = np.stack([self._window(self._train[c], o) for c, o in zip(labels, offsets)])
        return Batch(ids=ids, targets=None, labels=labels, key_padding_mask=np.zeros(ids.shape, bool))

    def majority_class_fraction(self, split: str) -> float:
        """Accuracy of always predicting the most common label of ``split``: 1/8 (balanced)."""
        _check_batch_args(split, 0, 1, 1)
        return float(np.bincount(self._val_labels).max() / len(self._val_labels)) if split == "val" else \
            1.0 / self.n_classes

    def decode(self, ids) -> str:
        """The snippet of one example (1-D ids) as text (PAD/CLS dropped, invalid UTF-8 replaced)."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or np.any((ids < 0) | (ids >= self.vocab_size)):
            raise DataError(f"decode expects the ids of one example (1-D, in [0, {self.vocab_size})), got {ids!r}")
        return bytes(int(i) - 2 for i in ids if i >= 2).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"StdlibPackages(root={self.root!r}, max_length={self.max_length}, n_val={self.n_val}, "
                f"sha256={self.digest[:12]}…, seed={self.seed})")
