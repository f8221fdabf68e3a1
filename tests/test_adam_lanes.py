"""backends/refimpl_numba/adam_lanes.py: AdamW in lanes (the overlapped host update's kernel) gives the reference's
bits for any cut into pieces, any block size and any number of lanes, and counts the pieces that are final."""
import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.kernels import optim as ref

lanes_mod = pytest.importorskip("refimpl_numba.adam_lanes")

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 3000), cuts=st.lists(st.integers(0, 3000), max_size=5), lanes=st.integers(1, 5),
       block=st.sampled_from([64, 128, 1 << 16]), grad=st.sampled_from(sorted(DTYPES)),
       copy=st.sampled_from([None, *sorted(DTYPES)]), adamw_mode=st.booleans(), first=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_lanes_match_the_reference_bit_for_bit(n, cuts, lanes, block, grad, copy, adamw_mode, first, seed):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    m = (rng.standard_normal(n) * 0.1).astype(np.float32)
    v = (rng.random(n) * 0.01).astype(np.float32)
    g = (rng.standard_normal(n) * 4).astype(DTYPES[grad])
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=int(rng.integers(1, 50)),
                 grad_scale=float(rng.choice([1.0, 0.5, 1024.0])), adamw_mode=adamw_mode)
    want = [p.copy(), m.copy(), v.copy()]
    want_out = None if copy is None else np.empty(n, DTYPES[copy])
    ref.adam_step(*want[:1], g, *want[1:], **hyper, out_lowp=want_out)
    bounds = sorted({0, n, *[c for c in cuts if c <= n]})
    pieces = len(bounds) - 1
    work = lanes_mod.new_work(first + pieces + 2)        # pieces before and after: another sub-group's
    out = None if copy is None else np.empty(n, DTYPES[copy])
    run = lanes_mod.adam_lanes(p, g, m, v, bounds=bounds, first=first, work=work, out_lowp=out, block=block, **hyper)
    assert lanes_mod.pieces_done(work) == 0
    ts = [threading.Thread(target=run) for _ in range(lanes)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for got, exp in zip((p, m, v), want):
        assert np.array_equal(got.view(np.uint32), exp.view(np.uint32))
    if copy is not None:
        assert np.array_equal(out.view(np.uint8), want_out.view(np.uint8))
    mine = slice(first, first + pieces)
    assert np.array_equal(work[0, mine], np.maximum(1, -(-np.diff(bounds) // block)))
    assert np.array_equal(work[2, mine], work[0, mine])                 # every block finished once
    assert np.all(work[1, mine] == work[0, mine] + lanes)              # each lane's last claim found none left
    assert lanes_mod.pieces_done(work) == (first + pieces if first == 0 else 0)   # (pieces before: not prepared)


def test_pieces_are_final_in_order_once_every_block_is_finished():
    """Blocks of 64 over pieces of 100 and 40 elements: 2 and 1 blocks. A piece is final when all its blocks are,
    and only after every piece before it is."""
    p, m, v = np.ones(140, np.float32), np.zeros(140, np.float32), np.zeros(140, np.float32)
    work = lanes_mod.new_work(2)
    lanes_mod.adam_lanes(p, np.ones(140, np.float32), m, v, bounds=[0, 100, 140], first=0, work=work, block=64,
                         **HYPER)
    assert work[0].tolist() == [2, 1] and lanes_mod.pieces_done(work) == 0
    work[2] = [1, 1]                                   # the second piece is done, the first is not yet
    assert lanes_mod.pieces_done(work) == 0
    work[2, 0] = 2
    assert lanes_mod.pieces_done(work) == 2


def test_one_lane_does_it_all_and_late_lanes_find_nothing_left():
    p, m, v = np.ones(1000, np.float32), np.zeros(1000, np.float32), np.zeros(1000, np.float32)
    work = lanes_mod.new_work(1)
    run = lanes_mod.adam_lanes(p, np.ones(1000, np.float32), m, v, bounds=[0, 1000], first=0, work=work, block=64,
                               **HYPER)
    run()
    assert np.all(p < 1) and lanes_mod.pieces_done(work) == 1
    before = p.copy()
    run()                                              # a lane that starts after the last block was claimed
    assert np.array_equal(p, before) and work[2, 0] == 16


def test_bad_bounds_blocks_and_arrays_lanes_cannot_take():
    p, m, v = np.ones(10, np.float32), np.zeros(10, np.float32), np.zeros(10, np.float32)
    work = lanes_mod.new_work(1)
    with pytest.raises(ValueError, match=r"piece bounds must rise from 0 to the 10 elements, got \[0, 5\]"):
        lanes_mod.adam_lanes(p, p, m, v, bounds=[0, 5], first=0, work=work, **HYPER)
    with pytest.raises(ValueError, match="block must be a positive multiple of 64 elements .* got 100"):
        lanes_mod.adam_lanes(p, p, m, v, bounds=[0, 10], first=0, work=work, block=100, **HYPER)
    with pytest.raises(ValueError, match=r"pieces 1\.\.1 are not all in work's 1"):
        lanes_mod.adam_lanes(p, p, m, v, bounds=[0, 10], first=1, work=work, **HYPER)
    strided = np.ones(20, np.float32)[::2]
    assert lanes_mod.adam_lanes(strided, p, m, v, bounds=[0, 10], first=0, work=work, **HYPER) is None
    assert lanes_mod.adam_lanes(p, p, m, v, bounds=[0, 10], first=0, work=work,
                                out_lowp=np.ones(20, np.float16)[::2], **HYPER) is None
