"""The CuPy-GPU backend (`REFIMPL_BACKEND=cupy`; install with `pip install 'refimpl[cupy]'`, which pulls
cupy-cuda13x: CuPy >= 14 built for CUDA 13, the version the device machine carries).

The same interface as the NumPy reference (refimpl/backend.py) on one CUDA device:

- memory: device arrays are cupy arrays (bfloat16 as CuPy's ml_dtypes.bfloat16 arrays: _runtime.py says
  how kernels treat them); `pinned_empty` gives page-locked host numpy arrays, so `copy_async` on a
  `stream()` overlaps host<->device traffic with compute; `event()`s order streams.
- kernels: cuBLAS GEMMs and fused NVRTC kernels (dense.py, optim.py, attention.py; the CUDA is in
  _source.py), compared with the reference by the spec tests (`REFIMPL_TEST_BACKENDS=cupy`).

Importing this module never imports cupy: the entry point loads on machines without it, and
`check_available()` says why the backend cannot run ("cupy: not installed; ...", "cupy: no CUDA device").
"""
import numpy as np

from refimpl.backend import Backend, BackendError


class _LazyCupy:
    """`CupyBackend.xp`: the cupy module, imported on first use."""

    def __get__(self, obj, owner):
        import cupy
        return cupy


class CupyBackend(Backend):
    name = "cupy"
    xp = _LazyCupy()
    is_gpu = True

    @classmethod
    def check_available(cls) -> None:
        try:
            import cupy
        except ImportError:
            raise BackendError("cupy: not installed; install refimpl[cupy]") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # CUDARuntimeError (no driver, no device) and friends: never a raw CUDA error
            raise BackendError("cupy: no CUDA device") from None
        if count < 1:
            raise BackendError("cupy: no CUDA device")

    def warmup(self):
        """Compile the kernel module once (NVRTC; CuPy caches it on disk for later sessions)."""
        from . import _runtime
        _runtime.module()

    # ------------------------------------------------------------------------------------- memory
    def asarray(self, host, dtype=None):
        """A device array holding `host` (numpy, a scalar or a device array), converted to `dtype`."""
        from . import _runtime as rt
        cp = rt.cupy()
        if isinstance(host, cp.ndarray):
            return host if dtype is None or host.dtype == np.dtype(dtype) else rt.cast(host, dtype)
        h = np.ascontiguousarray(np.asarray(host, dtype=dtype))
        if h.dtype == rt.bfloat16:
            rt.check_bf16_supported()
            return cp.asarray(h.view(np.uint16)).view(rt.bfloat16)
        return cp.asarray(h)

    def to_numpy(self, arr) -> np.ndarray:
        from . import _runtime as rt
        cp = rt.cupy()
        if isinstance(arr, cp.ndarray):
            if arr.dtype == rt.bfloat16:
                return rt.raw(arr).get().view(rt.bfloat16)
            return arr.get()
        return np.asarray(arr)

    def empty(self, shape, dtype=np.float32):
        from . import _runtime as rt
        return rt.empty(shape, dtype)

    def zeros(self, shape, dtype=np.float32):
        from . import _runtime as rt
        return rt.zeros(shape, dtype)

    def pinned_empty(self, shape, dtype=np.float32) -> np.ndarray:
        """A numpy array in page-locked host memory (what makes host<->device copies asynchronous)."""
        from . import _runtime as rt
        cp = rt.cupy()
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        mem = cp.cuda.alloc_pinned_memory(max(count * dtype.itemsize, 1))
        return np.ndarray(shape, dtype, buffer=mem)  # the array keeps `mem` alive (as cupyx.empty_pinned)

    def stream(self):
        from . import _runtime as rt
        return rt.cupy().cuda.Stream(non_blocking=True)

    async_copies = True   # copies on a second stream run on the copy engines, beside kernels

    def current_stream(self):
        from . import _runtime as rt
        return rt.cupy().cuda.get_current_stream()

    def event(self):
        from . import _runtime as rt
        return rt.cupy().cuda.Event()

    def elapsed_ms(self, start, end) -> float:
        from . import _runtime as rt
        return float(rt.cupy().cuda.get_elapsed_time(start, end))

    def copy_async(self, dst, src, stream=None) -> None:
        """dst[...] = src queued on `stream` (the current stream if None): host->device, device->host or
        device->device. Asynchronous with respect to the host when the host side is pinned; src must
        not change and dst must not be read until the stream (or an event recorded on it) is waited on.
        Both sides must be C-contiguous with the same dtype and size."""
        from . import _runtime as rt
        cp = rt.cupy()
        d_dev, s_dev = isinstance(dst, cp.ndarray), isinstance(src, cp.ndarray)
        if not (d_dev or s_dev):
            dst[...] = src
            return
        if dst.dtype != src.dtype or dst.size != src.size:
            raise ValueError(f"copy_async: dst is {dst.dtype} {dst.shape}, src is {src.dtype} {src.shape}; "
                             "they must have the same dtype and size")
        for name, a in (("dst", dst), ("src", src)):
            if not a.flags.c_contiguous:
                raise ValueError(f"copy_async: {name} of shape {a.shape} is not C-contiguous")
        stream = cp.cuda.get_current_stream() if stream is None else stream
        nbytes = dst.nbytes
        if nbytes == 0:
            return
        if d_dev and s_dev:
            dst.data.copy_from_device_async(src.data, nbytes, stream)
        elif d_dev:
            dst.data.copy_from_host_async(src.ctypes.data, nbytes, stream)
        else:
            src.data.copy_to_host_async(dst.ctypes.data, nbytes, stream)

    def synchronize(self) -> None:
        """Wait for all queued work on every stream of the current device."""
        from . import _runtime as rt
        rt.cupy().cuda.Device().synchronize()

    # ------------------------------------------------------------------------------------ kernels
    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        from . import dense
        return dense.matmul(a, b, transpose_a, transpose_b)

    def add(self, a, b):
        from . import dense
        return dense.add(a, b)

    def softmax(self, x, axis=-1):
        from . import dense
        return dense.softmax(x, axis)

    def softmax_backward(self, dy, y, axis=-1):
        from . import dense
        return dense.softmax_backward(dy, y, axis)

    def layernorm(self, x, weight, bias, eps=1e-5):
        from . import dense
        return dense.layernorm(x, weight, bias, eps)

    def layernorm_backward(self, dy, x, weight, mean, rstd):
        from . import dense
        return dense.layernorm_backward(dy, x, weight, mean, rstd)

    def gelu(self, x):
        from . import dense
        return dense.gelu(x)

    def gelu_backward(self, dy, x):
        from . import dense
        return dense.gelu_backward(dy, x)

    def embedding(self, weight, ids):
        from . import dense
        return dense.embedding(weight, ids)

    def embedding_backward(self, dout, ids, num_embeddings):
        from . import dense
        return dense.embedding_backward(dout, ids, num_embeddings)

    def cross_entropy(self, logits, targets, ignore_index=-100):
        from . import dense
        return dense.cross_entropy(logits, targets, ignore_index)

    def cross_entropy_backward(self, dloss, logits, targets, lse, ignore_index=-100):
        from . import dense
        return dense.cross_entropy_backward(dloss, logits, targets, lse, ignore_index)

    def adam_step(self, param, grad, exp_avg, exp_avg_sq, **hyper):
        from . import optim
        return optim.adam_step(param, grad, exp_avg, exp_avg_sq, **hyper)

    def sum_squares(self, x) -> float:
        from . import optim
        return optim.sum_squares(x)

    def has_inf_or_nan(self, x) -> bool:
        from . import optim
        return optim.has_inf_or_nan(x)

    def cast(self, x, dtype):
        from . import optim
        return optim.cast(x, dtype)

    def attention(self, q, k, v, *, causal=False, key_padding_mask=None, scale=None, block_size=None):
        from . import attention
        return attention.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                   block_size=block_size)

    def attention_backward(self, dout, q, k, v, out, lse, *, causal=False, key_padding_mask=None, scale=None,
                           block_size=None):
        from . import attention
        return attention.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                            key_padding_mask=key_padding_mask, scale=scale,
                                            block_size=block_size)
