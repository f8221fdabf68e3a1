"""refimpl/data_snippets.py: which standard-library package a window of source bytes comes from."""
import numpy as np
import pytest

from refimpl.data import DataError, make_dataset
from refimpl.data_snippets import PACKAGES, StdlibPackages


def fake_stdlib(root, sizes):
    """A tree with one package per PACKAGES entry: package i holds files of distinct bytes (its letter), tests
    skipped; sizes[i] bytes of source in total."""
    for i, name in enumerate(PACKAGES):
        pkg = root / name
        (pkg / "sub").mkdir(parents=True)
        (pkg / "tests").mkdir()
        (pkg / "tests" / "test_x.py").write_bytes(b"#" * 5000)   # pruned, as in the LM corpus
        letter = bytes([ord("a") + i])
        half = sizes[i] // 2
        (pkg / "__init__.py").write_bytes(letter * half)
        (pkg / "sub" / "mod.py").write_bytes(letter.upper() * (sizes[i] - half - 1))   # + the b"\n" joining them
    return root


@pytest.fixture
def tree(tmp_path):
    return fake_stdlib(tmp_path, [2000 + 100 * i for i in range(len(PACKAGES))])


def test_windows_come_from_their_own_package_and_split(tree):
    ds = StdlibPackages(tree, max_length=50, n_val=16, val_fraction=0.25, seed=3)
    for split in ("train", "val"):
        for step in range(5):
            b = ds.get_batch(split, step, 8, 51)
            assert b.ids.shape == (8, 51) and np.all(b.ids[:, 0] == ds.CLS) and not b.key_padding_mask.any()
            for ids, label in zip(b.ids, b.labels):
                text = ds.decode(ids)
                letters = {chr(ord("a") + label), chr(ord("A") + label), "\n"}
                assert len(text) == 50 and set(text) <= letters     # the bytes of package `label` only
                size = 2000 + 100 * label
                tail = int(size * 0.25)
                # the second file's capital letters fill the end: val windows lie in the tail, train ones before
                capitals = sum(c.isupper() for c in text)
                if split == "val":
                    assert capitals == 50                        # the tail is inside the second file
                else:
                    assert text.count("\n") <= 1
    assert ds.majority_class_fraction("val") == pytest.approx(1 / 8)


def test_val_is_fixed_balanced_and_interleaved_train_is_a_function_of_seed_and_step(tree):
    ds = StdlibPackages(tree, max_length=40, n_val=24, seed=1)
    v = ds.get_batch("val", 0, 8, 41)
    assert v.labels.tolist() == list(range(8))                  # one of each package per 8
    assert np.array_equal(ds.get_batch("val", 3, 8, 41).ids, v.ids)   # 24 examples: batch 3 wraps to batch 0
    a, b = ds.get_batch("train", 7, 16, 41), ds.get_batch("train", 7, 16, 41)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.labels, b.labels)
    other = StdlibPackages(tree, max_length=40, n_val=24, seed=2).get_batch("train", 7, 16, 41)
    assert not np.array_equal(other.ids, a.ids)
    labels = np.concatenate([ds.get_batch("train", s, 64, 41).labels for s in range(20)])
    assert set(labels.tolist()) == set(range(8)) and np.bincount(labels).min() > 100   # uniform draws


def test_the_real_standard_library_gives_eight_packages():
    ds = make_dataset({"dataset": "stdlib_packages", "max_length": 64, "n_val": 80, "seed": 0})
    assert ds.n_classes == 8 and ds.vocab_size == 258 and len(ds.digest) == 64
    b = ds.get_batch("val", 0, 16, 65)
    assert b.labels.tolist() == list(range(8)) * 2 and b.ids.min() >= 1 and b.ids.max() < 258


def test_errors_name_the_bad_value(tree, tmp_path):
    with pytest.raises(DataError, match="seq_len=30 must be max_length \\+ 1 = 41"):
        StdlibPackages(tree, max_length=40).get_batch("train", 0, 2, 30)
    with pytest.raises(DataError, match="package 'asyncio' under .* has 2000 bytes of source: too few for windows "
                                        "of max_length=1000"):
        StdlibPackages(tree, max_length=1000)
    with pytest.raises(DataError, match="is not a directory"):
        StdlibPackages(tmp_path / "nope")
    with pytest.raises(DataError, match="n_val must be an integer >= 8, got 3"):
        StdlibPackages(tree, n_val=3)
    with pytest.raises(DataError, match=r"val_fraction must be in \(0, 0.5\], got 0.9"):
        StdlibPackages(tree, val_fraction=0.9)
    empty = tmp_path / "empty"
    (empty / "asyncio").mkdir(parents=True)
    with pytest.raises(DataError, match="package 'asyncio' .* has 0 bytes"):
        StdlibPackages(empty)
