"""Properties of refimpl/zero/partition.py: the per-parameter layout every ZeRO stage shares (ZeRO §5).

Each parameter of numel n is cut into N chunks of c = ceil(n / N) elements (the last one zero-padded) and rank r
owns chunk r of every parameter. Hypothesis draws parameter shapes with n < N, n not a multiple of N and n a
multiple of N, for N = 1..5, and the tests check the layout against index arithmetic done here: element j of
rank r's chunk of a parameter is element r*c + j of the flat parameter, or a zero of padding past its end.
"""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.zero.partition import PartitionLayout, partition_bytes

shapes = st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple)   # () is a scalar parameter: numel 1
dtypes = st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16])


@st.composite
def models(draw):
    """(named shapes, N, dtype, {name: array}) with distinct, nonzero values (zeros would hide padding bugs)."""
    named = [(f"p{i}", s) for i, s in enumerate(draw(st.lists(shapes, min_size=1, max_size=5)))]
    n_partitions = draw(st.integers(1, 5))
    dtype = draw(dtypes)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    # small integers are exact in every dtype drawn, so equality below is exact
    arrays = {name: rng.integers(1, 100, size=shape).astype(dtype) for name, shape in named}
    return named, n_partitions, np.dtype(dtype), arrays


def expected_chunk(flat, rank, chunk):
    """Rank `rank`'s chunk of a flat parameter, from the definition: elements r*c .. r*c+c-1, zero past the end."""
    out = np.zeros(chunk, dtype=flat.dtype)
    for j in range(chunk):
        i = rank * chunk + j
        if i < flat.size:
            out[j] = flat[i]
    return out


@given(models())
def test_slots_are_contiguous_equal_chunks_in_model_order(model):
    named, N, _, _ = model
    layout = PartitionLayout(named, N)
    assert [s.name for s in layout.slots] == [n for n, _ in named]
    offset = 0
    for slot, (_, shape) in zip(layout.slots, named):
        numel = math.prod(shape)
        assert slot.numel == numel and slot.shape == shape
        assert slot.chunk == math.ceil(numel / N)                   # the least padding that makes N equal chunks
        assert slot.chunk * N >= numel > (slot.chunk - 1) * N
        assert slot.offset == offset                                # each slot starts where the previous ends
        offset += slot.chunk
    assert layout.partition_numel == offset
    assert layout.numel == sum(math.prod(s) for _, s in named)


@given(models())
def test_every_partition_has_the_same_length_and_padding_is_zero(model):
    named, N, dtype, arrays = model
    layout = PartitionLayout(named, N)
    S = sum(math.ceil(math.prod(shape) / N) for _, shape in named)  # computed here, not read from the layout
    for r in range(N):
        part = layout.partition(arrays, r)
        assert part.shape == (S,) and part.dtype == dtype
        col = 0
        for name, shape in named:
            chunk = math.ceil(math.prod(shape) / N)
            want = expected_chunk(arrays[name].reshape(-1), r, chunk)
            np.testing.assert_array_equal(part[col:col + chunk], want)  # values, then zeros of padding
            np.testing.assert_array_equal(layout.view(part, layout.by_name[name]), want)
            col += chunk


@given(models())
def test_partition_then_unpartition_is_exact(model):
    named, N, dtype, arrays = model
    layout = PartitionLayout(named, N)
    stacked = np.stack([layout.partition(arrays, r) for r in range(N)])      # (N, S): what an all-gather returns
    for gathered in (stacked, stacked.reshape(-1)):                          # (N, S) or the flat (N*S,)
        back = layout.unpartition(gathered)
        assert list(back) == [n for n, _ in named]
        for name, shape in named:
            assert back[name].shape == shape and back[name].dtype == dtype
            np.testing.assert_array_equal(back[name], arrays[name])


@given(models())
def test_to_rows_row_r_is_partition_r(model):
    named, N, dtype, arrays = model
    layout = PartitionLayout(named, N)
    rows = layout.to_rows(arrays)
    assert rows.shape == (N, layout.partition_numel) and rows.dtype == dtype
    for r in range(N):
        np.testing.assert_array_equal(rows[r], layout.partition(arrays, r))
    as_f32 = layout.to_rows(arrays, dtype=np.float32)                    # the gradient reduction's dtype
    assert as_f32.dtype == np.float32
    np.testing.assert_array_equal(as_f32, rows.astype(np.float32))


@given(models(), st.data())
def test_to_rows_of_a_subset_of_slots_is_those_columns(model, data):
    """A stage-2 gradient bucket holds some parameters: its rows are the matching columns of the full rows."""
    named, N, _, arrays = model
    layout = PartitionLayout(named, N)
    picked = data.draw(st.lists(st.sampled_from(layout.slots), min_size=1, unique_by=lambda s: s.name))
    rows = layout.to_rows({s.name: arrays[s.name] for s in picked}, slots=picked)
    full = layout.to_rows(arrays)
    want = np.concatenate([full[:, s.offset:s.offset + s.chunk] for s in picked], axis=1)
    np.testing.assert_array_equal(rows, want)


@given(models(), st.integers(2, 4))
def test_summing_rows_is_a_reduce_scatter(model, n_ranks):
    """Row r of the sum of every rank's gradient rows == partition r of the summed gradient (what ZeRO relies on)."""
    named, N, _, _ = model
    layout = PartitionLayout(named, N)
    rng = np.random.default_rng(0)
    grads = [{n: rng.integers(-50, 50, size=s).astype(np.float32) for n, s in named} for _ in range(n_ranks)]
    summed_rows = sum(layout.to_rows(g) for g in grads)
    total = {n: sum(g[n] for g in grads) for n, _ in named}
    for r in range(N):
        np.testing.assert_array_equal(summed_rows[r], layout.partition(total, r))


def test_partition_casts_to_the_requested_dtype():
    layout = PartitionLayout([("w", (3, 3))], 2)
    w = np.arange(9, dtype=np.float16).reshape(3, 3)
    part = layout.partition({"w": w}, 1, dtype=np.float32)        # fp32 master partition cut from fp16 weights
    assert part.dtype == np.float32
    np.testing.assert_array_equal(part, [5, 6, 7, 8, 0])            # chunk = ceil(9/2) = 5: elements 5..8 + pad
    assert partition_bytes(layout, np.float16) == 5 * 2


@pytest.mark.parametrize("bad", [0, -1])
def test_num_partitions_must_be_positive(bad):
    with pytest.raises(ValueError, match=rf"num_partitions must be >= 1, got {bad}"):
        PartitionLayout([("w", (2,))], bad)
