"""Tests of refimpl.data: determinism, step-purity, split hygiene and the ListOps labels.

Expected values are computed independently here: the byte corpus is rebuilt from the files in the test,
and ListOps expressions are re-parsed from ``decode()`` text and evaluated by a tiny evaluator below.
"""
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from refimpl.data import Batch, ByteCorpus, DataError, ListOps, make_dataset


# ------------------------------------------------------------------------------------------------ helpers

def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _letters(rng, n, upper=False) -> bytes:
    base = ord("A") if upper else ord("a")
    return bytes((base + rng.integers(0, 26, size=n)).astype(np.uint8).tolist())


@pytest.fixture(scope="module")
def two_region_dir(tmp_path_factory):
    """a.py: 899 random lowercase bytes, b.py: 100 random uppercase bytes. With the b"\\n" separator the
    corpus is 1000 bytes, so val_fraction=0.1 makes the val tail exactly b.py: train bytes are lowercase
    (plus one newline), val bytes uppercase — a window's letters say which split it came from."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1234)
    a, b = _letters(rng, 899), _letters(rng, 100, upper=True)
    _write(root, "a.py", a)
    _write(root, "b.py", b)
    return root, a + b"\n" + b


def _parse(text: str):
    """Parse '[MAX 2 9 [MIN 4 7 ] 0 ]' into (op, [args]) / int, independently of refimpl.data."""
    tokens = text.split()
    pos = 0

    def node():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok.isdigit():
            return int(tok)
        assert tok in ("[MIN", "[MAX", "[MED", "[SM"), tok
        args = []
        while tokens[pos] != "]":
            args.append(node())
        pos += 1
        return (tok, args)

    tree = node()
    assert pos == len(tokens), f"trailing tokens in {text!r}"
    return tree


def _evaluate(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree
    vals = sorted(_evaluate(a) for a in args)
    if op == "[MIN":
        return vals[0]
    if op == "[MAX":
        return vals[-1]
    if op == "[SM":
        return sum(vals) % 10
    n = len(vals)  # MED: LRA's int(np.median(...)), i.e. floor of the mean of the middle two when n is even
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) // 2


def _shape(tree, depth=1):
    """(deepest operator depth, list of argument counts) of a parsed tree; the root is depth 1."""
    if isinstance(tree, int):
        return 0, []
    deepest, counts = depth, [len(tree[1])]
    for a in tree[1]:
        d, c = _shape(a, depth + 1)
        deepest, counts = max(deepest, d), counts + c
    return deepest, counts


# ------------------------------------------------------------------------------------------------ ByteCorpus

def test_corpus_is_the_sorted_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    contents = {rel: _letters(rng, 30) for rel in
                ["z.py", "b/c.py", "a.py", "b/a.py", "B.py", "pkg/tests_helper.py", "test.py"]}
    for rel, data in contents.items():
        _write(tmp_path, rel, data)
    # Everything below must be skipped.
    _write(tmp_path, "test/x.py", b"skip")
    _write(tmp_path, "pkg/tests/y.py", b"skip")
    _write(tmp_path, "idlelib/z.py", b"skip")
    _write(tmp_path, "site-packages/w.py", b"skip")
    _write(tmp_path, "bad.py", b"\xff\xfe not utf-8 \xc3")
    _write(tmp_path, "notes.txt", b"not python")

    c = ByteCorpus(tmp_path, max_bytes=10_000, val_fraction=0.2)
    expected_files = sorted(contents)  # code-point order of the POSIX relative paths
    assert c.files == tuple(expected_files)
    blob = b"\n".join(contents[f] for f in expected_files)
    assert c.n_bytes == len(blob)
    assert c.digest == hashlib.sha256(blob).hexdigest()
    assert c.n_val_bytes == int(len(blob) * 0.2) and c.n_train_bytes + c.n_val_bytes == len(blob)


def test_max_bytes_cuts_the_concatenation(tmp_path):
    for name in "abcd":
        _write(tmp_path, f"{name}.py", name.encode() * 100)
    c = ByteCorpus(tmp_path, max_bytes=150)
    blob = (b"a" * 100 + b"\n" + b"b" * 100)[:150]
    assert c.files == ("a.py", "b.py") and c.n_bytes == 150
    assert c.digest == hashlib.sha256(blob).hexdigest()


def test_file_choice_ignores_directory_listing_order(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    for rel in ["m.py", "a/b.py", "a/a.py", "q/r/s.py", "c.py"]:
        _write(tmp_path, rel, _letters(rng, 50))
    forward = ByteCorpus(tmp_path)

    real_scandir = os.scandir

    class ReversedScandir:  # stands in for os.scandir inside os.walk, yielding entries in reverse order
        def __init__(self, path):
            with real_scandir(path) as it:
                self.entries = iter(list(it)[::-1])

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", ReversedScandir)
    assert [e.name for e in os.scandir(tmp_path)] == [e.name for e in real_scandir(tmp_path)][::-1]
    backward = ByteCorpus(tmp_path)
    assert backward.files == forward.files and backward.digest == forward.digest


def test_default_path_is_the_stdlib():
    c = ByteCorpus(max_bytes=200_000)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert Path(c.root) == root and c.n_bytes == 200_000
    assert list(c.files) == sorted(c.files)
    for rel in c.files:
        parts = rel.split("/")
        assert rel.endswith(".py")
        assert not {"site-packages", "test", "tests", "idlelib"} & set(parts[:-1]), rel
    blob = b"\n".join((root / rel).read_bytes() for rel in c.files)[:200_000]
    assert c.digest == hashlib.sha256(blob).hexdigest()


def test_byte_batches_are_shifted_windows_of_the_right_split(two_region_dir):
    root, blob = two_region_dir
    c = ByteCorpus(root, val_fraction=0.1)
    train, val = blob[:900], blob[900:]
    assert c.n_train_bytes == 900 and val.isupper()
    T, B = 8, 64
    touched_train_end = touched_val_end = False
    for step in range(100):
        for split, region in (("train", train), ("val", val)):
            b = c.get_batch(split, step, B, T)
            assert b.ids.shape == b.targets.shape == (B, T)
            assert b.ids.dtype == b.targets.dtype == np.int64
            assert b.labels is None and b.key_padding_mask is None
            np.testing.assert_array_equal(b.ids[:, 1:], b.targets[:, :-1])
            for ids, tgt in zip(b.ids, b.targets):
                window = bytes(ids.tolist()) + bytes([int(tgt[-1])])  # T+1 bytes
                assert window in region, (split, window)
                if split == "train":
                    assert not any(ch.isupper() for ch in window.decode())  # never in the val tail
                    touched_train_end |= train.endswith(window)
                else:
                    touched_val_end |= val.endswith(window)
    # The offset range is right up to the end of each split (no off-by-one leaves the last byte unused).
    assert touched_train_end and touched_val_end


@given(step=st.integers(0, 10**12), batch_size=st.integers(1, 9), seq_len=st.integers(1, 90),
       split=st.sampled_from(["train", "val"]))
def test_byte_batches_are_pure_functions_of_step(two_region_dir, step, batch_size, seq_len, split):
    root, _ = two_region_dir
    a, b = ByteCorpus(root, seed=3), ByteCorpus(root, seed=3)
    a.get_batch("train", step + 1, 4, 5)  # history of calls must not matter
    a.get_batch("val", 0, 2, 3)
    x, y = a.get_batch(split, step, batch_size, seq_len), b.get_batch(split, step, batch_size, seq_len)
    np.testing.assert_array_equal(x.ids, y.ids)
    np.testing.assert_array_equal(x.targets, y.targets)


def test_byte_batches_depend_on_seed_step_and_split(two_region_dir):
    root, _ = two_region_dir
    c0, c1 = ByteCorpus(root, seed=0), ByteCorpus(root, seed=1)
    assert c0.digest == c1.digest  # the corpus itself does not depend on the seed
    base = c0.get_batch("train", 7, 16, 20).ids
    assert not np.array_equal(base, c1.get_batch("train", 7, 16, 20).ids)
    assert not np.array_equal(base, c0.get_batch("train", 8, 16, 20).ids)
    assert not np.array_equal(c0.get_batch("val", 7, 16, 20).ids, c0.get_batch("val", 8, 16, 20).ids)


def test_byte_corpus_path_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        ByteCorpus(missing)
    a_file = tmp_path / "f.py"
    a_file.write_bytes(b"x = 1\n")
    with pytest.raises(DataError, match="not a directory"):
        ByteCorpus(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no readable .py files") as info:
        ByteCorpus(empty)
    assert str(empty) in str(info.value)
    only_skipped = tmp_path / "skipped"
    _write(only_skipped, "tests/t.py", b"x = 1\n")
    _write(only_skipped, "bad.py", b"\xff\xff")
    _write(only_skipped, "readme.txt", b"hello")
    with pytest.raises(DataError, match="no readable .py files"):
        ByteCorpus(only_skipped)


@pytest.mark.parametrize("kwargs", [dict(val_fraction=0.0), dict(val_fraction=0.51), dict(val_fraction=-0.1),
                                    dict(max_bytes=0), dict(max_bytes=-5), dict(seed=-1)])
def test_byte_corpus_argument_errors(two_region_dir, kwargs):
    root, _ = two_region_dir
    with pytest.raises(DataError, match=list(kwargs)[0]):
        ByteCorpus(root, **kwargs)


def test_byte_corpus_seq_len_longer_than_split(two_region_dir):
    root, _ = two_region_dir
    c = ByteCorpus(root, val_fraction=0.1)  # val has 100 bytes
    c.get_batch("val", 0, 2, 99)  # 100 bytes fit exactly
    with pytest.raises(DataError, match=r"seq_len=100 needs 101 .* only 100"):
        c.get_batch("val", 0, 2, 100)
    with pytest.raises(DataError, match=r"seq_len=900 needs 901 .* only 900"):
        c.get_batch("train", 0, 2, 900)
    with pytest.raises(DataError, match="split"):
        c.get_batch("test", 0, 2, 4)
    with pytest.raises(DataError, match="step"):
        c.get_batch("train", -1, 2, 4)


# ------------------------------------------------------------------------------------------------ ListOps

@pytest.fixture(scope="module")
def listops():
    return ListOps(n_train=600, n_val=80, seed=0)


def _all(ds: ListOps, split: str) -> Batch:
    """Every example of a split: step 0 with batch_size = split size (for train: one whole epoch)."""
    n = ds.n_train if split == "train" else ds.n_val
    return ds.get_batch(split, 0, n, ds.max_length + 1)


def test_listops_labels_match_an_independent_evaluator(listops):
    for split in ("train", "val"):
        b = _all(listops, split)
        for ids, label in zip(b.ids, b.labels):
            tree = _parse(listops.decode(ids))
            assert _evaluate(tree) == label


def test_listops_decode_format_and_evaluator_examples():
    # Hand-checked examples for the independent evaluator itself (MED of an even count floors).
    assert _evaluate(_parse("[MAX 2 9 [MIN 4 7 ] 0 ]")) == 9
    assert _evaluate(_parse("[MED 1 2 ]")) == 1 and _evaluate(_parse("[MED 3 8 1 ]")) == 3
    assert _evaluate(_parse("[SM 9 8 [MIN 5 7 ] ]")) == 2
    ds = ListOps(n_train=5, n_val=2)
    # ids for "[MAX 2 9 [MIN 4 7 ] 0 ]" under the documented vocabulary: PAD CLS MIN MAX MED SM ] 0..9
    ids = [1, 3, 7 + 2, 7 + 9, 2, 7 + 4, 7 + 7, 6, 7 + 0, 6, 0, 0]
    assert ds.decode(ids) == "[MAX 2 9 [MIN 4 7 ] 0 ]"
    assert ds.vocab_size == 17 and ds.n_classes == 10 and ds.PAD == 0 and ds.CLS == 1
    with pytest.raises(DataError, match="outside the vocabulary"):
        ds.decode([1, 17])


def test_listops_sequences_padding_and_shape_limits(listops):
    T = listops.max_length + 9
    b = listops.get_batch("train", 3, 50, T)
    assert b.ids.shape == b.key_padding_mask.shape == (50, T) and b.labels.shape == (50,)
    assert b.ids.dtype == b.labels.dtype == np.int64 and b.key_padding_mask.dtype == bool
    assert b.targets is None
    np.testing.assert_array_equal(b.key_padding_mask, b.ids == ListOps.PAD)
    assert (b.ids[:, 0] == ListOps.CLS).all()
    n_real = (~b.key_padding_mask).sum(axis=1)
    # padding is a suffix: the first n_real positions are real, the rest padding
    np.testing.assert_array_equal(b.key_padding_mask, np.arange(T)[None, :] >= n_real[:, None])
    for ids, n in zip(b.ids, n_real):  # real positions = [CLS] + the expression's tokens, nothing else
        assert n == 1 + len(listops.decode(ids).split())
        assert (ids[1:n] > ListOps.CLS).all()
    for split in ("train", "val"):
        for ids in _all(listops, split).ids:
            text = listops.decode(ids)
            assert listops.min_length <= len(text.split()) <= listops.max_length
            depth, arg_counts = _shape(_parse(text))
            assert 1 <= depth <= listops.max_depth - 1  # LRA: nodes at max_depth are always digits
            assert all(2 <= k <= listops.max_args for k in arg_counts)


def test_listops_operators_and_label_spread(listops):
    texts = [listops.decode(ids) for ids in _all(listops, "train").ids]
    for op in ("[MIN", "[MAX", "[MED", "[SM"):
        assert sum(op in t.split() for t in texts) > 50, op
    labels = _all(listops, "train").labels
    counts = np.bincount(labels, minlength=10)
    assert (counts > 0).sum() >= 8
    assert listops.majority_class_fraction("train") == counts.max() / len(labels) < 0.5
    val_counts = np.bincount(_all(listops, "val").labels, minlength=10)
    assert listops.majority_class_fraction("val") == val_counts.max() / listops.n_val


def test_listops_examples_are_unique_and_val_is_disjoint(listops):
    train = {listops.decode(ids) for ids in _all(listops, "train").ids}
    val = [listops.decode(ids) for ids in _all(listops, "val").ids]
    assert len(train) == listops.n_train and len(set(val)) == listops.n_val
    assert not train & set(val)


def test_listops_is_deterministic_per_seed():
    a, b, c = ListOps(n_train=100, n_val=20, seed=4), ListOps(n_train=100, n_val=20, seed=4), \
        ListOps(n_train=100, n_val=20, seed=5)
    for split in ("train", "val"):
        np.testing.assert_array_equal(_all(a, split).ids, _all(b, split).ids)
        assert not np.array_equal(_all(a, split).ids, _all(c, split).ids)
    np.testing.assert_array_equal(a.get_batch("train", 7, 8, 65).ids, b.get_batch("train", 7, 8, 65).ids)
    assert not np.array_equal(a.get_batch("train", 7, 8, 65).ids, c.get_batch("train", 7, 8, 65).ids)


@given(step=st.integers(0, 10**9), batch_size=st.integers(1, 13), split=st.sampled_from(["train", "val"]))
def test_listops_batch_is_slice_of_one_example_stream(listops, step, batch_size, split):
    """Batch s of size B holds stream positions s*B .. s*B+B-1, and call history never matters: compare
    with the same positions fetched one at a time (B=1), after unrelated calls."""
    listops.get_batch("train", step + 3, 5, 65)
    b = listops.get_batch(split, step, batch_size, 65)
    singles = [listops.get_batch(split, step * batch_size + j, 1, 65) for j in range(batch_size)]
    np.testing.assert_array_equal(b.ids, np.concatenate([s.ids for s in singles]))
    np.testing.assert_array_equal(b.labels, np.concatenate([s.labels for s in singles]))


def test_listops_train_epochs_are_permutations_and_val_wraps(listops):
    n, B = listops.n_train, 40  # 600 / 40 = 15 steps per epoch
    everything = sorted(map(tuple, _all(listops, "train").ids.tolist()))
    for epoch in range(2):
        seen = np.concatenate([listops.get_batch("train", epoch * 15 + s, B, 65).ids for s in range(15)])
        assert sorted(map(tuple, seen.tolist())) == everything  # each example exactly once per epoch
    e0 = listops.get_batch("train", 0, n, 65).ids
    e1 = listops.get_batch("train", 1, n, 65).ids
    assert not np.array_equal(e0, e1)  # a fresh order each epoch
    val = _all(listops, "val")
    wrapped = listops.get_batch("val", 3, 30, 65)  # positions 90..119 of an 80-example val set
    np.testing.assert_array_equal(wrapped.ids, val.ids[np.arange(90, 120) % 80])
    np.testing.assert_array_equal(wrapped.labels, val.labels[np.arange(90, 120) % 80])


def test_listops_errors(listops):
    with pytest.raises(DataError, match=r"seq_len=64.*65"):
        listops.get_batch("train", 0, 4, 64)
    with pytest.raises(DataError, match="split"):
        listops.get_batch("dev", 0, 4, 65)
    with pytest.raises(DataError, match="batch_size"):
        listops.get_batch("train", 0, 0, 65)
    with pytest.raises(DataError, match="min_length"):
        ListOps(min_length=30, max_length=20)
    with pytest.raises(DataError, match="unreachable"):
        ListOps(max_depth=2, max_args=3, min_length=6)  # longest is [OP d d d ] = 5 tokens
    with pytest.raises(DataError, match="max_args"):
        ListOps(max_args=1)
    with pytest.raises(DataError, match="n_train"):
        ListOps(n_train=0)
    with pytest.raises(DataError, match="unique"):
        ListOps(n_train=500, max_depth=2, max_args=2, min_length=4, max_length=4)  # only 4*100 such trees


# ------------------------------------------------------------------------------------------------ make_dataset

def test_make_dataset(two_region_dir):
    root, blob = two_region_dir
    c = make_dataset({"dataset": "stdlib_bytes", "path": str(root), "val_fraction": 0.1, "seed": 2,
                      "n_train": 99})  # keys of the other dataset are ignored
    assert isinstance(c, ByteCorpus) and c.digest == hashlib.sha256(blob).hexdigest() and c.seed == 2
    d = make_dataset({"dataset": "listops", "n_train": 30, "n_val": 5, "max_length": 40, "path": None})
    assert isinstance(d, ListOps) and (d.n_train, d.n_val, d.max_length, d.max_depth) == (30, 5, 40, 4)
    with pytest.raises(DataError, match="stdlib_bytes") as info:
        make_dataset({"dataset": "wikitext"})
    assert "listops" in str(info.value) and "wikitext" in str(info.value)
    with pytest.raises(DataError, match="data.batch_size"):
        make_dataset({"dataset": "listops", "batch_size": 3})
