"""cupy-specific checks the shared spec tests do not reach (backends/refimpl_cupy).

- Without cupy, selecting the backend says how to install it (runs everywhere, no GPU needed).
- Memory: pinned host buffers, host->device->device->host copies on a stream ordered by an event, bf16 arrays
  round-trip bit for bit.
- The tier manager's copy stream (refimpl/memory/transfer.py): bytes arrive intact, a host->device copy runs
  beside a kernel already queued on the compute stream (it does not wait for it), and the ledger gets device
  intervals for it.
- The fused AdamW's fp16/bf16 copy-out meets the edges of those formats (overflow, ties, subnormals).
- FlashAttention at a realistic head dim and length (more tiles than the spec tests' shapes) matches the
  plain form.
"""
import sys

import ml_dtypes
import numpy as np
import pytest

from refimpl.backend import BackendError, available_backends

from .tolerances import assert_close

bfloat16 = ml_dtypes.bfloat16


def test_cupy_missing_says_install_refimpl_cupy(monkeypatch):
    from refimpl_cupy import CupyBackend
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    with pytest.raises(BackendError, match=r"install refimpl\[cupy\]"):
        CupyBackend.check_available()
    assert "install refimpl[cupy]" in available_backends()["cupy"]


@pytest.fixture(scope="module")
def cupy_backend():
    why = available_backends().get("cupy", "cupy: not a registered backend")
    if why is not None:
        pytest.skip(why)
    from refimpl.backend import get_backend
    return get_backend("cupy")



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, bfloat16])
def test_copy_stream_round_trip_and_runs_beside_compute(cupy_backend, dtype):
    import cupy
    from refimpl.memory.ledger import Ledger
    from refimpl.memory.transfer import CopyStream
    be, ledger = cupy_backend, Ledger()
    copies = CopyStream(be, ledger)
    n = 16 << 20                                                   # 32-64 MB: milliseconds on PCIe
    host = copies.host_empty(n * np.dtype(dtype).itemsize).view(dtype)
    assert cupy.cuda.runtime.pointerGetAttributes(host.ctypes.data).type == 1 and host.ctypes.data % 4096 == 0
    host[...] = np.random.default_rng(0).standard_normal(n).astype(dtype)
    a = cupy.random.default_rng(1).standard_normal((4096, 4096), dtype=cupy.float32)
    busy_start, busy_end = be.event(), be.event()
    busy_start.record(be.current_stream())
    for _ in range(20):                                             # tens of ms of queued compute
        a = a @ a * np.float32(1e-2)
    busy_end.record(be.current_stream())
    dev = copies.to_device(host, "x")
    back = copies.host_empty(host.nbytes).view(dtype)
    assert copies.to_host(dev, back, "x").wait() is back
    assert np.array_equal(back.view(np.uint8), host.view(np.uint8))   # bit for bit, bf16 too
    ledger.flush()
    (h2d,) = [e for e in ledger.events if e["kind"] == "transfer" and e["dst"] == "device"]
    (d2h,) = [e for e in ledger.events if e["kind"] == "transfer" and e["dst"] == "host"]
    assert h2d["nbytes"] == d2h["nbytes"] == host.nbytes and h2d["end"] > h2d["start"]
    # the host->device copy started before the queued compute ended: it did not wait for it
    assert h2d["start"] < copies.clock.time(busy_end), (h2d, copies.clock.time(busy_start), copies.clock.time(busy_end))
    assert d2h["start"] >= h2d["end"] - 1e-6                      # and the copy back waited for its data


@pytest.mark.gpu
def test_pinned_copies_round_trip_on_a_stream(cupy_backend):
    import cupy
    be = cupy_backend
    host = be.pinned_empty((1000,), np.float32)
    assert isinstance(host, np.ndarray) and host.shape == (1000,)
    attrs = cupy.cuda.runtime.pointerGetAttributes(host.ctypes.data)
    assert attrs.type == 1, f"pinned_empty memory type {attrs.type}, expected 1 (cudaMemoryTypeHost)"
    host[...] = np.arange(1000, dtype=np.float32)
    dev, dev2 = be.empty((1000,), np.float32), be.empty((1000,), np.float32)
    back = be.pinned_empty((1000,), np.float32)
    s = be.stream()
    be.copy_async(dev, host, s)
    be.copy_async(dev2, dev, s)
    e = be.event()
    e.record(s)
    s2 = be.stream()
    s2.wait_event(e)  # a second stream ordered after the first by the event
    be.copy_async(back, dev2, s2)
    s2.synchronize()
    np.testing.assert_array_equal(back, host)
    with pytest.raises(ValueError, match="same dtype and size"):
        be.copy_async(be.empty((3,), np.float32), np.zeros(4, np.float32))


@pytest.mark.gpu
def test_bfloat16_arrays_round_trip(cupy_backend):
    be = cupy_backend
    x = (np.arange(-50, 50) / 7).astype(bfloat16)
    d = be.asarray(x)
    assert np.dtype(d.dtype) == np.dtype(bfloat16)
    back = be.to_numpy(d)
    assert np.dtype(back.dtype) == np.dtype(bfloat16)
    np.testing.assert_array_equal(back.view(np.uint16), x.view(np.uint16))
    z = be.to_numpy(be.zeros((4, 3), bfloat16))
    assert np.dtype(z.dtype) == np.dtype(bfloat16) and not z.astype(np.float32).any()


@pytest.mark.gpu
@pytest.mark.parametrize("lowp", [np.float16, bfloat16], ids=["float16", "bfloat16"])
def test_adam_copy_out_rounds_like_astype_at_the_edges(cupy_backend, lowp):
    be = cupy_backend
    f16 = [65504.0, 65519.0, 65520.0, 7e4, 2049.0, 2051.0, 6.1035156e-05, 6.09e-05, 2 ** -24, 2 ** -25,
           1.5 * 2 ** -25, 2 ** -26, 3 * 2 ** -25, 1e-30, 0.0, -0.0, 1.0, -1.0]
    bf16 = [1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.3895314e38, 3.4028235e38, 1.1754944e-38]
    bits = np.random.default_rng(0).integers(0, 2 ** 32, size=4000, dtype=np.uint64).astype(np.uint32)
    rnd = bits.view(np.float32)
    edges = np.array(f16 + bf16, np.float32)
    param = np.concatenate([edges, -edges, rnd[np.isfinite(rnd)]])
    zeros = np.zeros_like(param)
    p, g, m, v = (be.asarray(a.copy()) for a in (param, zeros, zeros, zeros))
    out = be.zeros(param.shape, lowp)
    be.adam_step(p, g, m, v, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, out_lowp=out)
    with np.errstate(over="ignore"):
        expected = param.astype(lowp)
    np.testing.assert_array_equal(be.to_numpy(out).view(np.uint16), expected.view(np.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attention_matches_plain_at_head_dim(cupy_backend, D, causal):
    be = cupy_backend
    rng = np.random.default_rng(D)
    B, H, T = 2, 3, 300
    q, k, v, dout = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))
    mask = rng.random((B, T)) < 0.2
    kw = dict(causal=causal, key_padding_mask=be.asarray(mask))
    dq_, dk_, dv_, do_ = (be.asarray(a) for a in (q, k, v, dout))
    out_p, lse_p = be.attention(dq_, dk_, dv_, **kw)
    out_t, lse_t = be.attention(dq_, dk_, dv_, block_size=64, **kw)
    scale = float(np.abs(v).max())
    assert_close(be.to_numpy(out_t), be.to_numpy(out_p), np.float32, scale=scale, what="flash out")
    assert_close(be.to_numpy(lse_t), be.to_numpy(lse_p), np.float32, scale=10.0, what="flash lse")
    gp = be.attention_backward(do_, dq_, dk_, dv_, out_p, lse_p, **kw)
    gt = be.attention_backward(do_, dq_, dk_, dv_, out_p, lse_p, block_size=64, **kw)
    for name, a, b in zip(("dq", "dk", "dv"), gt, gp):
        b = be.to_numpy(b)
        assert_close(be.to_numpy(a), b, np.float32, scale=float(np.abs(b).max()) * 4, what=f"flash {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bthd", "bthd_d40", "contiguous", "d20", "sliced"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lowp", [np.float16, bfloat16], ids=["float16", "bfloat16"])
def test_flash_tensor_cores_read_and_write_head_strided_arrays(cupy_backend, monkeypatch, lowp, causal, masked,
                                                               layout):
    """The tensor-core kernels take q, k, v, dO (and O) in their own strides and write out, dq, dk, dv in
    (B, T, H, D) order: bit for bit what the same calls give on contiguous copies. bthd: the model's head views
    of (B, T, H, D) arrays, read with no copy (D = 40: a padded head dim); d20 (rows 40 bytes apart) and sliced
    (rows starting 8 bytes in) are not 16-byte aligned, so the wrapper copies them first."""
    from refimpl_cupy import _runtime as rt
    be = cupy_backend
    B, H, Tq, Tk, D = 2, 3, 90, 130, {"bthd_d40": 40, "d20": 20}.get(layout, 64)
    rng = np.random.default_rng(0)

    def make(T):
        """(the array in `layout`, a contiguous (B, H, T, D) copy of it) on the device"""
        h = rng.standard_normal((B, T, H, D)).astype(lowp)
        ref = be.asarray(np.ascontiguousarray(h.transpose(0, 2, 1, 3)))
        if layout == "contiguous":
            return be.asarray(np.ascontiguousarray(h.transpose(0, 2, 1, 3))), ref
        if layout == "sliced":
            wide = np.zeros((B, T, H, D + 8), lowp)
            wide[..., 4:4 + D] = h
            return be.asarray(wide)[..., 4:4 + D].transpose(0, 2, 1, 3), ref
        return be.asarray(h).transpose(0, 2, 1, 3), ref

    (q, qc), (k, kc), (v, vc), (do, doc) = make(Tq), make(Tk), make(Tk), make(Tq)
    mask = rng.random((B, Tk)) < 0.3
    mask[1, :] = True                                  # batch 1: no key at all (out = 0, lse = -inf)
    kw = dict(causal=causal, key_padding_mask=be.asarray(mask) if masked else None, block_size=64)
    copies, contiguous = [], rt.contiguous

    def counted(x):
        if not x.flags.c_contiguous:
            copies.append(x.shape)
        return contiguous(x)
    monkeypatch.setattr(rt, "contiguous", counted)
    out, lse = be.attention(q, k, v, **kw)
    grads = be.attention_backward(do, q, k, v, out, lse, **kw)
    assert (copies == []) == (layout in ("bthd", "bthd_d40", "contiguous")), copies
    out_c, lse_c = be.attention(qc, kc, vc, **kw)
    grads_c = be.attention_backward(doc, qc, kc, vc, contiguous(out_c), lse_c, **kw)

    def bits(x):
        h = be.to_numpy(x)
        return h.view(f"u{h.itemsize}")
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + tuple(grads), (out_c, lse_c) + tuple(grads_c)):
        np.testing.assert_array_equal(bits(a), bits(b), err_msg=f"{layout}: {name}")
    # outputs are (B, H, T, D) views of (B, T, H, D) arrays, so the model's transpose(1, 2).reshape copies nothing
    for x, T in ((out, Tq), (grads[0], Tq), (grads[1], Tk), (grads[2], Tk)):
        s = x.itemsize
        assert x.shape == (B, H, T, D) and x.strides == (T * H * D * s, D * s, H * D * s, s)
        assert x.transpose(0, 2, 1, 3).flags.c_contiguous
