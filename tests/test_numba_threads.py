"""The numba backend's threads (backends/refimpl_numba/_threads.py, _blas.py) and the kernels that use them.

- in_chunks runs every run of rows exactly once, the first on the calling thread, and raises a chunk's error;
- attention's cut of the rows (`_cuts`) has the smallest largest run a brute force finds, and covers every row;
- OpenBLAS's gemm is found where NumPy's BLAS is OpenBLAS (else the fast path would vanish unseen);
- matmul on row chunks gives the reference's result, for every shape the model makes (Linear forward, dx, dW),
  through gemm on numba's threads and through the thread pool (where gemm is not found);
- attention with key tiles that are padding in a row (they are skipped) equals the reference, and without gemm
  the backend gives the reference's own result;
- selecting the backend pins NumPy's OpenBLAS (where it is the BLAS) to one thread, and a `limited` block that
  ends later does not undo it.
"""
import itertools
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba", reason="numba not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the shared tolerance table (spec_tests/)
from spec_tests.tolerances import assert_close  # noqa: E402

from refimpl.backend import get_backend  # noqa: E402
from refimpl.kernels import attention as ref_attention  # noqa: E402
from refimpl.kernels import dense as ref_dense  # noqa: E402
from refimpl_numba import _blas, _threads  # noqa: E402
from refimpl_numba.attention import _cuts, _live_tiles  # noqa: E402


@pytest.fixture(scope="module")
def nb():
    return get_backend("numba")


def test_in_chunks_runs_each_row_once_first_on_the_caller():
    x = np.zeros(10, int)
    _threads.in_chunks(lambda rows: rows.__iadd__(1), [0, 3, 3, 7, 10], (x,))   # an empty run is skipped
    assert (x == 1).all()
    ran = []
    _threads.in_chunks(lambda rows: ran.append((int(rows[0]), threading.get_ident())), [0, 5, 10], (np.arange(10),))
    assert sorted(r for r, _ in ran) == [0, 5]
    assert (0, threading.get_ident()) in ran                       # the first run is the caller's


def test_in_chunks_raises_the_error_of_a_pool_chunk():
    def work(rows):
        if rows[0] >= 5:
            raise ValueError(f"bad row {rows[0]}")
    with pytest.raises(ValueError, match="bad row 5"):
        _threads.in_chunks(work, [0, 5, 10], (np.arange(10),))


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_cuts_minimise_the_largest_run(parts):
    """Each row walks its own live tiles: a run's work is the sum of its rows'."""
    rng = np.random.default_rng(parts)
    for _ in range(60):
        work = rng.integers(1, 9, size=int(rng.integers(1, 9)))

        def bottleneck(cuts):
            return max(work[lo:hi].sum() for lo, hi in zip(cuts[:-1], cuts[1:]))
        cuts = _cuts(work, parts)
        assert cuts[0] == 0 and cuts[-1] == len(work) and all(a < b for a, b in zip(cuts[:-1], cuts[1:]))
        assert len(cuts) - 1 <= parts
        best = min(bottleneck([0, *inner, len(work)])
                   for k in range(min(parts, len(work)))
                   for inner in itertools.combinations(range(1, len(work)), k))
        assert bottleneck(cuts) == best


def test_live_tiles_count_the_tiles_with_a_key_seen():
    mask = np.zeros((4, 200), bool)
    mask[1, 150:] = True              # keys 128-149 are seen: 3 tiles of 64
    mask[2, :] = True                 # all padding: one tile (the row still gets its zero output)
    mask[3, :130] = True              # leading padding: tiles 0 and 1 are skipped, 2 and 3 walked
    assert _live_tiles(mask, 64).tolist() == [4, 3, 1, 2]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("a_shape,b_shape,ta,tb", [
    ((16, 128, 48), (96, 48), False, True),     # Linear forward: x @ W^T over (batch, seq) rows
    ((2048, 40), (40, 96), False, False),       # Linear dx: g @ W
    ((300, 72), (300, 40), True, False),        # Linear dW: g^T @ x (K long, output small: K is cut)
    ((64, 400), (40, 400), False, True),        # K cut, b transposed
    ((64, 401), (401, 40), False, False),       # K cut, odd
    ((64, 7), (7, 5), False, False),            # the smallest that is cut
    ((63, 7), (7, 5), False, False),            # one row fewer: one call
])
@pytest.mark.parametrize("path", ["gemm", "pool"])
def test_matmul_in_chunks_equals_the_reference(nb, dtype, a_shape, b_shape, ta, tb, path, monkeypatch):
    if path == "pool":                                       # as where NumPy's BLAS is not OpenBLAS
        monkeypatch.setitem(_blas._gemms, np.dtype(dtype), None)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(a_shape).astype(dtype), rng.standard_normal(b_shape).astype(dtype)
    out = nb.matmul(a, b, transpose_a=ta, transpose_b=tb)
    expected = ref_dense.matmul(a.astype(np.float64), b.astype(np.float64), transpose_a=ta, transpose_b=tb)
    scale = ref_dense.matmul(np.abs(a).astype(np.float64), np.abs(b).astype(np.float64), transpose_a=ta,
                             transpose_b=tb)             # sum |a_ik b_kj|: the error bound of any summation order
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected, dtype, scale=scale, what="numba matmul")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(16, 128, 128), (65537,), (3, 7, 4099)])
def test_add_on_threads_gives_numpys_bits(nb, dtype, shape):
    """Large adds of one shape, or with a bias over the last axis, run on numba's threads (dense.py `add`): one
    IEEE add each, NumPy's bits exactly, for sizes that split unevenly too; other broadcasts go to NumPy."""
    from refimpl_numba.dense import _ADD_MIN
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    assert a.size >= _ADD_MIN
    out = nb.add(a, b)
    assert out.dtype == dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a + b)
    bias = b.reshape(-1)[:shape[-1]].copy()
    np.testing.assert_array_equal(nb.add(a, bias), a + bias)           # a bias over the last axis
    np.testing.assert_array_equal(nb.add(bias, a), bias + a)
    np.testing.assert_array_equal(nb.add(a, b[..., :1]), a + b[..., :1])   # other broadcasts: NumPy


def test_gemm_is_found_where_numpy_uses_openblas():
    from refimpl import blas_threads
    if blas_threads.get_threads() is None:
        pytest.skip("NumPy's BLAS here is not an OpenBLAS whose thread count can be read")
    found = blas_threads.symbol("cblas_sgemm")
    assert found is not None
    assert (_blas.gemm(np.float32) is not None) == found[1]   # used where its integers are 64-bit
    assert _blas.gemm(np.float16) is None


def test_matmul_low_precision_goes_to_the_reference(nb):
    a = np.ones((80, 4), np.float16)
    out = nb.matmul(a, a, transpose_b=True)
    assert out.dtype == np.float16 and np.array_equal(out, ref_dense.matmul(a, a, transpose_b=True))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("path", ["gemm", "reference"])
def test_attention_skips_key_tiles_that_are_padding(nb, causal, path, monkeypatch):
    """Batch rows 2 and 3 pad all keys from 64 on, so their rows skip those tiles; rows 0 and 1 pad parts of one."""
    if path == "reference":                                  # as where NumPy's BLAS is not OpenBLAS
        monkeypatch.setitem(_blas._gemms, np.dtype(np.float64), None)
    rng = np.random.default_rng(1)
    B, H, T, D = 4, 2, 200, 8
    q, k, v, dout = (rng.standard_normal((B, H, T, D)) for _ in range(4))
    mask = np.zeros((B, T), bool)
    mask[0, 64:70] = True             # the first keys of a tile: the rest of it is still seen
    mask[1, 150:] = True
    mask[2:, 64:] = True
    out, lse = nb.attention(q, k, v, causal=causal, key_padding_mask=mask, block_size=64)
    grads = nb.attention_backward(dout, q, k, v, out, lse, causal=causal, key_padding_mask=mask, block_size=64)
    out_r, lse_r = ref_attention.attention(q, k, v, causal=causal, key_padding_mask=mask)
    grads_r = ref_attention.attention_backward(dout, q, k, v, out_r, lse_r, causal=causal, key_padding_mask=mask)
    for got, want in [(out, out_r), (lse, lse_r), *zip(grads, grads_r)]:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_selecting_numba_pins_openblas_to_one_thread(nb):
    from refimpl import blas_threads
    from refimpl_numba import NumbaBackend
    if blas_threads.get_threads() is None:
        pytest.skip("NumPy's BLAS here is not an OpenBLAS whose thread count can be read")
    blas_threads.set_threads(2)
    NumbaBackend()                                           # what selecting the backend runs
    assert blas_threads.get_threads() == 1
    with blas_threads.limited(1):                            # a training's limit ends ...
        pass
    assert blas_threads.get_threads() == 1                   # ... and leaves the pin alone


@pytest.mark.parametrize("layout", ["heads_transposed", "reversed_time", "every_other_feature"])
def test_attention_reads_strided_inputs_and_lays_out_like_q(nb, layout):
    """The model hands attention its heads as a transposed view of (B, T, H, D): the kernels read it in place
    and write out (and dq, dk, dv) in the same order, so the transpose back is a view. Strides BLAS cannot take
    (reversed time, a non-contiguous last axis) are copied first; every result equals the reference."""
    rng = np.random.default_rng(3)
    B, T, H, D = 2, 70, 3, 8
    width = 2 * D if layout == "every_other_feature" else D
    q, k, v, dout = (rng.standard_normal((B, T, H, width)).transpose(0, 2, 1, 3) for _ in range(4))
    if layout == "reversed_time":
        q, k, v, dout = (a[:, :, ::-1] for a in (q, k, v, dout))
    if layout == "every_other_feature":
        q, k, v, dout = (a[..., ::2] for a in (q, k, v, dout))
    out, lse = nb.attention(q, k, v, causal=True)
    grads = nb.attention_backward(dout, q, k, v, out, lse, causal=True)
    out_r, lse_r = ref_attention.attention(q, k, v, causal=True)
    grads_r = ref_attention.attention_backward(dout, q, k, v, out_r, lse_r, causal=True)
    for got, want in [(out, out_r), (lse, lse_r), *zip(grads, grads_r)]:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if layout == "heads_transposed":
        for a in (out, *grads):
            assert a.transpose(0, 2, 1, 3).flags.c_contiguous
