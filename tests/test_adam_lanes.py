"""backends/refimpl_numba/adam_lanes.py: AdamW in lanes (the overlapped host update's kernel) gives the reference's
bits, piece by piece, for any cut into pieces and any number of lanes, and counts each lane's pieces."""
import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.kernels import optim as ref

lanes_mod = pytest.importorskip("refimpl_numba.adam_lanes")

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@settings(deadline=None, max_examples=25)
@given(n=st.integers(1, 3000), cuts=st.lists(st.integers(0, 3000), max_size=5), lanes=st.integers(1, 5),
       grad=st.sampled_from(sorted(DTYPES)), copy=st.sampled_from([None, *sorted(DTYPES)]),
       adamw_mode=st.booleans(), first=st.integers(0, 7), seed=st.integers(0, 2**16), threads=st.booleans())
def test_lanes_match_the_reference_bit_for_bit(n, cuts, lanes, grad, copy, adamw_mode, first, seed, threads):
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
    progress = np.zeros(lanes, np.int64)
    out = None if copy is None else np.empty(n, DTYPES[copy])
    run = lanes_mod.adam_lanes(p, g, m, v, bounds=bounds, first=first, progress=progress, out_lowp=out, **hyper)
    if threads:
        ts = [threading.Thread(target=run, args=(lane, lanes)) for lane in range(lanes)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    else:
        for lane in reversed(range(lanes)):               # lanes are independent: any order
            run(lane, lanes)
    for got, exp in zip((p, m, v), want):
        assert np.array_equal(got.view(np.uint32), exp.view(np.uint32))
    if copy is not None:
        assert np.array_equal(out.view(np.uint8), want_out.view(np.uint8))
    assert progress.tolist() == [first + len(bounds) - 1] * lanes
    assert lanes_mod.lanes_done(progress) == first + len(bounds) - 1


def test_shares_are_whole_cache_lines_and_each_lane_counts_its_pieces():
    """A piece of 40 and one of 100 elements over 3 lanes: shares of 64 elements (whole cache lines), so lane 0 takes
    all of the first piece and [0, 64) of the second, lane 1 the rest, lane 2 nothing; each still counts both."""
    progress = np.zeros(3, np.int64)
    p, m, v = np.ones(140, np.float32), np.zeros(140, np.float32), np.zeros(140, np.float32)
    run = lanes_mod.adam_lanes(p, np.ones(140, np.float32), m, v, bounds=[0, 40, 140], first=5, progress=progress,
                               lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    run(1, 3)
    assert progress.tolist() == [0, 7, 0] and lanes_mod.lanes_done(progress) == 0
    assert np.all(p[:104] == 1) and np.all(p[104:] < 1)
    run(2, 3)
    assert progress.tolist() == [0, 7, 7] and np.all(p[:104] == 1)
    run(0, 3)
    assert lanes_mod.lanes_done(progress) == 7 and np.all(p < 1)


def test_bad_bounds_and_arrays_lanes_cannot_take():
    p, m, v = np.ones(10, np.float32), np.zeros(10, np.float32), np.zeros(10, np.float32)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match=r"piece bounds must rise from 0 to the 10 elements, got \[0, 5\]"):
        lanes_mod.adam_lanes(p, p, m, v, bounds=[0, 5], first=0, progress=np.zeros(1, np.int64), **hyper)
    strided = np.ones(20, np.float32)[::2]
    assert lanes_mod.adam_lanes(strided, p, m, v, bounds=[0, 10], first=0, progress=np.zeros(1, np.int64),
                                **hyper) is None
    assert lanes_mod.adam_lanes(p, p, m, v, bounds=[0, 10], first=0, progress=np.zeros(1, np.int64),
                                out_lowp=np.ones(20, np.float16)[::2], **hyper) is None
