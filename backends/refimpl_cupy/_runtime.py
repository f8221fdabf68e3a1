"""What every CuPy kernel wrapper shares: the compiled module, dtype plumbing, launch helpers.

How bfloat16 lives on the GPU. The reference keeps bf16 as ml_dtypes.bfloat16 on the host. CuPy >= 14
accepts that dtype for device arrays (storage, views, copies; its own bf16 arithmetic is experimental), so
a bf16 array on the GPU is a cupy array of dtype ml_dtypes.bfloat16: `to_numpy` gives back the same dtype
and nothing is upcast in memory. No kernel of this backend relies on CuPy's bf16 arithmetic: our kernels see
bf16 (and fp16) arrays as uint16 views (`raw`) and convert in registers with round-to-nearest-even PTX
instructions (_source.py). A CuPy without bf16 dtype support gets a clear BackendError the first time a
bf16 array is made, never wrong numbers.
"""
import functools

import ml_dtypes
import numpy as np

from refimpl.backend import BackendError

from . import _source

bfloat16 = np.dtype(ml_dtypes.bfloat16)
_TWO_BYTE_FLOATS = (np.dtype(np.float16), bfloat16)
THREADS = 256
MAX_BLOCKS = 65535


def cupy():
    import cupy as cp
    return cp


@functools.lru_cache(maxsize=None)
def module():
    """The one NVRTC module holding every kernel (compiled once per process, cached on disk by CuPy)."""
    cp = cupy()
    # (CuPy appends -ftz=true after these options, so float arithmetic that must keep subnormals is written as
    # explicit PTX in _source.py)
    return cp.RawModule(code=_source.SOURCE, options=("-std=c++17",),
                        name_expressions=_source.name_expressions())


@functools.lru_cache(maxsize=None)
def kernel(name):
    return module().get_function(name)


@functools.lru_cache(maxsize=None)
def check_bf16_supported():
    cp = cupy()
    try:
        cp.zeros(1, np.uint16).view(bfloat16)
    except Exception as exc:  # CuPy < 14 or without ml_dtypes: no bf16 device arrays
        raise BackendError(f"cupy: this CuPy ({cp.__version__}) cannot hold bfloat16 arrays ({exc}); "
                           "bf16 needs cupy>=14 with ml_dtypes installed") from None


def ctype(dtype) -> str:
    """The kernels' C++ storage type of a float dtype, or a ValueError naming the allowed ones."""
    name = np.dtype(dtype).name
    if name not in _source.CTYPE:
        raise ValueError(f"dtype {name} is not supported by this kernel; allowed: {', '.join(_source.CTYPE)}")
    return _source.CTYPE[name]


def compute_dtype(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def raw(x):
    """x as the kernels see it: fp16/bf16 as a uint16 view (same memory), others unchanged."""
    return x.view(np.uint16) if x.dtype in _TWO_BYTE_FLOATS else x


def contiguous(x):
    """A C-contiguous device array with x's values (x itself when it already is)."""
    cp = cupy()
    if x.flags.c_contiguous:
        return x
    return cp.ascontiguousarray(raw(x)).view(x.dtype)


def empty(shape, dtype):
    cp = cupy()
    dtype = np.dtype(dtype)
    if dtype == bfloat16:
        check_bf16_supported()
        return cp.empty(shape, np.uint16).view(bfloat16)
    return cp.empty(shape, dtype)


def zeros(shape, dtype):
    out = empty(shape, dtype)
    raw(out).fill(0)  # 0 bits are +0.0 in every float format
    return out


def scalar(value, dtype):
    """A kernel argument of exactly the C++ type the kernel declares (CuPy passes numpy scalars by type)."""
    return np.dtype(dtype).type(value)


def grid_1d(n, threads=THREADS):
    return (max(1, min(MAX_BLOCKS, -(-n // threads))),)


def launch_elementwise(name, n, *args):
    if n:
        kernel(name)(grid_1d(n), (THREADS,), args)


def row_threads(d):
    """Threads of a one-block-per-row kernel: enough to cover short rows, 256 for long ones."""
    return 32 if d <= 32 else 128 if d <= 512 else 256


def launch_rows(name, rows, d, *args):
    if rows:
        kernel(name)((min(rows, MAX_BLOCKS),), (row_threads(d),), args)


def launch_shared(name, grid, block, args, shared_bytes):
    """Launch with `shared_bytes` of dynamic shared memory, raising the 48 KiB default cap when needed."""
    fn = kernel(name)
    if shared_bytes > 48 * 1024:
        _allow_shared(name, shared_bytes)
    fn(grid, block, args, shared_mem=shared_bytes)


@functools.lru_cache(maxsize=None)
def _allow_shared(name, shared_bytes):
    fn = kernel(name)
    if hasattr(fn, "max_dynamic_shared_size_bytes"):  # CuPy 14's get_function returns a RawKernel
        fn.max_dynamic_shared_size_bytes = int(shared_bytes)
        return
    from cupy.cuda import driver
    attr = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)
    driver.funcSetAttribute(fn.ptr, attr, int(shared_bytes))


def cast(x, dtype):
    """A new device array holding x converted to dtype (RNE; overflow -> +-inf), for any pair of the four
    float dtypes through the cast kernel; other dtypes through CuPy's astype."""
    dtype = np.dtype(dtype)
    if x.dtype.name in _source.CTYPE and dtype.name in _source.CTYPE:
        x = contiguous(x)
        out = empty(x.shape, dtype)
        launch_elementwise(f"cast_k<{ctype(x.dtype)}, {ctype(dtype)}>", x.size, raw(x), raw(out),
                           scalar(x.size, np.int64))
        return out
    if dtype == bfloat16 or x.dtype == bfloat16:
        return cast(cast(x, np.float32), dtype)  # e.g. int -> bf16 goes through float32
    return x.astype(dtype, copy=True)


def up(x):
    """x in its compute dtype (float64 stays, others float32); no copy when already there."""
    cdt = compute_dtype(x.dtype)
    if x.dtype == cdt:
        return x
    if x.dtype.name in _source.CTYPE:
        return cast(x, cdt)
    return x.astype(cdt)
