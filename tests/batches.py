"""Small hand-made batches for model-level tests (the tiny vocabulary V, N_CLASSES labels)."""
import numpy as np

from refimpl.data import Batch

V, N_CLASSES = 13, 4


def lm_batch(seed=0, B=2, T=7):
    """Next-token targets: ids shifted by one."""
    ids = np.random.default_rng(seed).integers(0, V, (B, T + 1))
    return Batch(ids=ids[:, :-1], targets=ids[:, 1:], labels=None, key_padding_mask=None)


def classify_batch(seed=0, B=3, T=8):
    """Rows of lengths T, T-3, 2 (padding id 0 after them) and random labels."""
    r = np.random.default_rng(seed)
    ids = r.integers(1, V, (B, T))
    lengths = np.array([T, T - 3, 2])[:B]
    kpm = np.arange(T)[None, :] >= lengths[:, None]   # (B, T) True = padding
    ids[kpm] = 0
    return Batch(ids=ids, targets=None, labels=r.integers(0, N_CLASSES, B), key_padding_mask=kpm)
