"""Seeded, deterministic datasets for training and checking refimpl models.

Two small tasks that need no download:

* ``ByteCorpus`` — byte-level language modelling on the running Python's standard-library sources
  (vocabulary of 256 bytes, next-byte targets). It exercises the LM head and causal attention.
* ``ListOps`` — the hierarchical-reasoning classification task of Nangia & Bowman (2018), "ListOps: A
  Diagnostic Dataset for Latent Tree Learning", generated with the algorithm the Long Range Arena uses
  (Tay et al. 2020, "Long Range Arena", google-research/long-range-arena,
  ``lra_benchmarks/data/listops.py``: ``generate_tree``, ``to_value``). It exercises the classifier head
  and key-padding masks.

Determinism is the contract that makes training resumable: everything is a pure function of the seed, and
the batch for training step ``s`` is a pure function of ``(seed, split, step, batch_size)``, never of
iterator state. A run resumed at step ``s`` therefore sees exactly the batches an uninterrupted run sees.
Random streams come from ``np.random.SeedSequence(seed, spawn_key=(domain, split, index))`` — NumPy's
documented way to derive independent streams — never from global RNG state or Python's ``hash()``.

For ZeRO data parallelism the caller cuts one batch into ``world_size`` equal micro-batches; this module
knows nothing about ranks.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

from .data_base import (_SPLITS, Batch, DataError, _candidate_files, _check_batch_args, _check_int,  # noqa: F401
                        _check_val_fraction, _read_source, _rng)

__all__ = ["Batch", "DataError", "ByteCorpus", "ListOps", "make_dataset", "listops_value"]


# The stream domains of this module (refimpl/data_base.py explains the spawn key); data_snippets.py uses 3,
# data_recsys.py 4 and 5.
_DOMAIN_BYTE_WINDOWS = 0   # ByteCorpus: window offsets of one batch
_DOMAIN_LISTOPS_GEN = 1    # ListOps: generation of a split's examples
_DOMAIN_LISTOPS_EPOCH = 2  # ListOps: per-epoch permutation of the train set


# ---------------------------------------------------------------------------------------------------------
# (a) Byte-level LM corpus from the standard-library sources
# ---------------------------------------------------------------------------------------------------------


class ByteCorpus:
    """Byte-level language-model corpus: Python standard-library sources, split into train / val.

    Files are every ``*.py`` under ``path`` (default: this interpreter's stdlib), sorted by relative POSIX
    path, concatenated with ``b"\\n"`` between them and cut at ``max_bytes`` (so the last file listed in
    ``files`` may be included only in part). The last ``val_fraction`` of the bytes is validation: one
    contiguous tail, so training windows never overlap it.

    Attributes for logging exactly what a run trained on: ``root``, ``files`` (relative paths, in order),
    ``n_bytes``, ``digest`` (sha256 hex of the concatenated bytes), ``n_train_bytes``, ``n_val_bytes``.
    """

    vocab_size = 256

    def __init__(self, path: str | os.PathLike | None = None, max_bytes: int = 4_000_000,
                 val_fraction: float = 0.1, seed: int = 0):
        self.seed = _check_int("seed", seed, 0)
        max_bytes = _check_int("max_bytes", max_bytes, 1)
        _check_val_fraction(val_fraction)
        root = Path(sysconfig.get_paths()["stdlib"] if path is None else path)
        if not root.exists():
            raise DataError(f"corpus path {str(root)!r} does not exist")
        if not root.is_dir():
            raise DataError(f"corpus path {str(root)!r} is not a directory")

        chunks: list[bytes] = []
        files: list[str] = []
        total = 0
        for rel in _candidate_files(root):
            sep = b"\n" if chunks else b""
            if total + len(sep) >= max_bytes:  # full: the next file could contribute no byte
                break
            data = _read_source(root / rel)
            if data is None:
                continue
            chunks += [sep, data]
            files.append(rel)
            total += len(sep) + len(data)
        blob = b"".join(chunks)[:max_bytes]
        if not files or len(blob) < 2:
            raise DataError(f"corpus path {str(root)!r} contains no readable .py files "
                            f"(found {len(files)} file(s), {len(blob)} byte(s))")

        self.root = str(root)
        self.files = tuple(files)
        self.n_bytes = len(blob)
        self.digest = hashlib.sha256(blob).hexdigest()
        data = np.frombuffer(blob, dtype=np.uint8)  # (n_bytes,), kept as uint8: 8x smaller than int64
        self.n_val_bytes = max(1, int(self.n_bytes * val_fraction))
        self.n_train_bytes = self.n_bytes - self.n_val_bytes
        self._split = {"train": data[:self.n_train_bytes], "val": data[self.n_train_bytes:]}

    def get_batch(self, split: str, step: int, batch_size: int, seq_len: int) -> Batch:
        """B windows of T+1 bytes at offsets drawn from an rng seeded by (seed, split, step).

        For ``split="val"`` the step is the evaluation batch index. ``targets`` are ``ids`` shifted by one.
        """
        step, B, T = _check_batch_args(split, step, batch_size, seq_len)
        data = self._split[split]
        if T + 1 > len(data):
            raise DataError(f"seq_len={T} needs {T + 1} consecutive bytes but the {split} split has only "
                            f"{len(data)}; use a shorter seq_len or a larger max_bytes")
        offsets = _rng(self.seed, _DOMAIN_BYTE_WINDOWS, split, step).integers(0, len(data) - T, size=B)
        windows = data[offsets[:, None] + np.arange(T + 1)].astype(np.int64)  # (B, T+1)
        return Batch(ids=windows[:, :-1], targets=windows[:, 1:], labels=None, key_padding_mask=None)

    def __repr__(self) -> str:
        return (f"ByteCorpus(root={self.root!r}, files={len(self.files)}, n_bytes={self.n_bytes}, "
                f"sha256={self.digest[:12]}…)")


# ---------------------------------------------------------------------------------------------------------
# (b) ListOps, generated with the Long Range Arena algorithm
# ---------------------------------------------------------------------------------------------------------

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUE_P = 0.25  # LRA: probability that a node (above max_depth) is an operator sub-tree rather than a digit

# Token ids: PAD=0, CLS=1, the four operators, "]", then digits 0..9.
_TOKENS = ("<pad>", "<cls>") + OPERATORS + (END,) + tuple(str(d) for d in range(10))
_TOKEN_ID = {tok: i for i, tok in enumerate(_TOKENS)}


def _generate_tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int):
    """LRA's ``generate_tree``: a digit (int) or ``(operator, [children])``, with the same draw order.

    Below max_depth a node is a sub-tree with probability VALUE_P, else a digit; a sub-tree has
    uniform(2..max_args) children, generated before its operator is drawn.
    """
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return int(rng.integers(10))
    n_args = int(rng.integers(2, max_args + 1))
    children = [_generate_tree(rng, depth + 1, max_depth, max_args) for _ in range(n_args)]
    return (OPERATORS[int(rng.integers(len(OPERATORS)))], children)


def _tree_tokens(tree, out: list[str]) -> list[str]:
    """Flatten a tree into LRA's token sequence, e.g. ["[MAX", "2", "9", "]"] (LRA's parentheses dropped)."""
    if isinstance(tree, int):
        out.append(str(tree))
    else:
        op, children = tree
        out.append(op)
        for child in children:
            _tree_tokens(child, out)
        out.append(END)
    return out


def listops_value(tree) -> int:
    """LRA's ``to_value``: MIN, MAX, MED = int(np.median(...)) (floor of the mean of the middle two for an
    even count), SM = sum mod 10."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    args = [listops_value(c) for c in children]
    if op == MIN:
        return min(args)
    if op == MAX:
        return max(args)
    if op == MED:
        return int(np.median(args))
    return sum(args) % 10  # SUM_MOD


def _max_tree_length(depth: int, max_depth: int, max_args: int) -> int:
    # Longest possible token sequence: every node above max_depth is an operator with max_args children.
    return 1 if depth >= max_depth else 2 + max_args * _max_tree_length(depth + 1, max_depth, max_args)


class ListOps:
    """ListOps classification: ``[CLS] [MAX 2 9 [MIN 4 7 ] 0 ]`` → label 9.

    Examples are generated once, in ``__init__``, as LRA does (``generate_tree(1, max_depth, max_args)``,
    kept when the token count is within ``[min_length, max_length]`` — inclusive here, LRA's bounds are
    strict). As in LRA (which collects examples in a set) examples are unique: train has no duplicates and
    val has none, nor any example that is also in train. Train and val come from independent streams.

    Batches: ``ids`` (B, T) = [CLS] + tokens, right-padded with PAD to ``seq_len``;
    ``key_padding_mask`` (B, T) True at PAD; ``labels`` (B,) the expression's value.
    Training batch ``s`` holds examples ``s*B .. s*B+B-1`` of an endless stream that walks one permutation
    of the train set per epoch (seeded by (seed, epoch)); val batch ``i`` holds examples ``i*B .. (i+1)*B-1``
    of the val set, wrapping around.
    """

    n_classes = 10
    PAD = 0
    CLS = 1
    vocab_size = len(_TOKENS)  # 17

    def __init__(self, n_train: int = 2000, n_val: int = 200, max_depth: int = 4, max_args: int = 5,
                 min_length: int = 8, max_length: int = 64, seed: int = 0):
        self.seed = _check_int("seed", seed, 0)
        self.n_train = _check_int("n_train", n_train, 1)
        self.n_val = _check_int("n_val", n_val, 1)
        self.max_depth = _check_int("max_depth", max_depth, 1)
        self.max_args = _check_int("max_args", max_args, 2)  # an operator takes at least two arguments
        self.min_length = _check_int("min_length", min_length, 1)
        self.max_length = _check_int("max_length", max_length, 1)
        if self.min_length > self.max_length:
            raise DataError(f"min_length ({self.min_length}) must be <= max_length ({self.max_length})")
        longest = _max_tree_length(1, self.max_depth, self.max_args)
        if longest < self.min_length:
            raise DataError(f"min_length={self.min_length} is unreachable: with max_depth={self.max_depth} and "
                            f"max_args={self.max_args} the longest expression has {longest} tokens")

        train = self._generate("train", self.n_train, exclude=set())
        val = self._generate("val", self.n_val, exclude={tuple(t) for t in train[0]})
        self._examples = {"train": self._encode(*train), "val": self._encode(*val)}

    def _generate(self, split: str, n: int, exclude: set) -> tuple[list[list[str]], list[int]]:
        rng = _rng(self.seed, _DOMAIN_LISTOPS_GEN, split, 0)
        seen, token_lists, labels = set(exclude), [], []
        # Most trees are rejected (75% are a lone digit); the cap turns an unsatisfiable setting into an error
        # rather than an endless loop.
        max_attempts = 1000 * n + 100_000
        for _ in range(max_attempts):
            tree = _generate_tree(rng, 1, self.max_depth, self.max_args)
            tokens = _tree_tokens(tree, [])
            key = tuple(tokens)
            if not self.min_length <= len(tokens) <= self.max_length or key in seen:
                continue
            seen.add(key)
            token_lists.append(tokens)
            labels.append(listops_value(tree))
            if len(labels) == n:
                return token_lists, labels
        raise DataError(f"could only generate {len(labels)} of {n} unique {split} examples with lengths in "
                        f"[{self.min_length}, {self.max_length}] in {max_attempts} attempts; widen the length "
                        f"range, raise max_depth/max_args or ask for fewer examples")

    def _encode(self, token_lists, labels) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(token_lists), self.max_length + 1), self.PAD, dtype=np.int64)  # (N, L+1)
        for row, tokens in zip(ids, token_lists):
            row[:len(tokens) + 1] = [self.CLS] + [_TOKEN_ID[t] for t in tokens]
        return ids, np.asarray(labels, dtype=np.int64)

    def _example_indices(self, split: str, step: int, B: int) -> np.ndarray:
        n = len(self._examples[split][1])
        positions = step * B + np.arange(B)  # (B,) positions in the endless example stream
        if split == "val":
            return positions % n
        epochs = positions // n
        indices = np.empty(B, dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch can straddle an epoch boundary
            perm = _rng(self.seed, _DOMAIN_LISTOPS_EPOCH, "train", int(epoch)).permutation(n)
            here = epochs == epoch
            indices[here] = perm[positions[here] % n]
        return indices

    def get_batch(self, split: str, step: int, batch_size: int, seq_len: int) -> Batch:
        """Batch ``step`` of ``split`` (for "val" the step is the evaluation batch index), padded to seq_len."""
        step, B, T = _check_batch_args(split, step, batch_size, seq_len)
        if T < self.max_length + 1:
            raise DataError(f"seq_len={T} is shorter than max_length + 1 = {self.max_length + 1} "
                            f"(the [CLS] token plus the longest expression)")
        ids_all, labels_all = self._examples[split]
        idx = self._example_indices(split, step, B)
        ids = np.full((B, T), self.PAD, dtype=np.int64)  # (B, T)
        ids[:, :ids_all.shape[1]] = ids_all[idx]
        return Batch(ids=ids, targets=None, labels=labels_all[idx].copy(), key_padding_mask=ids == self.PAD)

    def decode(self, ids) -> str:
        """Token ids of one example (1-D) back to text, e.g. "[MAX 2 9 [MIN 4 7 ] 0 ]" (PAD/CLS dropped)."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise DataError(f"decode expects the ids of one example (1-D), got shape {ids.shape}")
        bad = [int(i) for i in ids if not 0 <= i < len(_TOKENS)]
        if bad:
            raise DataError(f"token ids {bad} are outside the vocabulary [0, {len(_TOKENS)})")
        return " ".join(_TOKENS[i] for i in ids if i not in (self.PAD, self.CLS))

    def majority_class_fraction(self, split: str) -> float:
        """Accuracy of always predicting the most common label of ``split`` (a baseline to beat)."""
        if split not in _SPLITS:
            raise DataError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        labels = self._examples[split][1]
        return float(np.bincount(labels, minlength=self.n_classes).max() / len(labels))

    def __repr__(self) -> str:
        return (f"ListOps(n_train={self.n_train}, n_val={self.n_val}, max_depth={self.max_depth}, "
                f"max_args={self.max_args}, length=[{self.min_length}, {self.max_length}], seed={self.seed})")


# ---------------------------------------------------------------------------------------------------------
# Construction from the config's "data" section
# ---------------------------------------------------------------------------------------------------------

_BYTE_KEYS = ("path", "max_bytes", "val_fraction", "seed")
_LISTOPS_KEYS = ("n_train", "n_val", "max_depth", "max_args", "min_length", "max_length", "seed")
_SNIPPET_KEYS = ("path", "max_length", "n_val", "val_fraction", "max_bytes", "seed")
_DATASETS = {"stdlib_bytes": (ByteCorpus, _BYTE_KEYS), "listops": (ListOps, _LISTOPS_KEYS),
             "stdlib_packages": ("StdlibPackages", _SNIPPET_KEYS),   # (refimpl/data_snippets.py)
             "p5_synthetic": ("P5Sequences", ("seed",))}             # (refimpl/data_recsys.py)
_ALLOWED_KEYS = {"dataset", *_BYTE_KEYS, *_LISTOPS_KEYS, *_SNIPPET_KEYS}


def make_dataset(cfg: dict):
    """Build the dataset named by ``cfg["dataset"]`` from the config's "data" section.

    Keys meant for the other dataset are ignored (one section can hold both); missing keys take the
    constructor defaults; unknown keys and unknown dataset names are DataErrors.
    """
    if not isinstance(cfg, dict):
        raise DataError(f"the data section must be a dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - _ALLOWED_KEYS)
    if unknown:
        raise DataError(f"unknown key(s) {', '.join('data.' + k for k in unknown)}; "
                        f"allowed: {', '.join(sorted(_ALLOWED_KEYS))}")
    name = cfg.get("dataset")
    if name not in _DATASETS:
        raise DataError(f"data.dataset={name!r} is not a dataset; allowed: {', '.join(sorted(_DATASETS))}")
    cls, keys = _DATASETS[name]
    if cls == "StdlibPackages":
        from .data_snippets import StdlibPackages as cls   # (these build on this module)
    elif cls == "P5Sequences":
        from .data_recsys import P5Sequences as cls
    return cls(**{k: cfg[k] for k in keys if k in cfg})
