"""refimpl's numba-CPU backend: every kernel of the interface compiled with numba, parallel with prange.

Registered through the `refimpl.backends` entry point (pyproject.toml), exactly as a third-party backend
would be; select it with REFIMPL_BACKEND=numba or refimpl.use_backend("numba"). Arrays are plain NumPy
arrays (xp = numpy), so everything the backend does not override (memory, array code) is the reference's.

- dense.py      matmul (row chunks on threads), softmax, layernorm, GELU, embedding, cross-entropy, fwd and bwd
- attention.py  FlashAttention-2 forward/backward (plain and tiled forms): one numba kernel per direction,
                (batch, head) rows split among threads, tile products through BLAS, masks / online softmax /
                dS fused in numba, each tile in cache from its first product to its last
- _blas.py      OpenBLAS's gemm called from inside numba kernels, on numba's own threads
- _threads.py   a Python thread pool for the chunks where that gemm is not found
- optim.py      fused single-pass AdamW (+ fp16/bf16 copy-out), sum of squares, inf/nan check, cast
- _bits.py      float16 / bfloat16 bit conversions inside kernels (numba has neither type)
- _vmath.py     float32 exp / tanh that vectorise (numba's np.exp / np.tanh are scalar libm calls)

matmul is BLAS on chunks of the output's rows, one per numba thread. Selecting this backend sets NumPy's
OpenBLAS to one thread for the whole process: its own threads spin after each product and took the 2 cores from
the next kernel (refimpl/blas_threads.py). It also keeps freed memory in the process (refimpl/host_malloc.py) and
lets OpenMP's threads spin briefly before they sleep (below). float16/bfloat16 operands go to the reference,
which upcasts them to float32.

Kernels compile once per process and are cached on disk (`cache=True`, in __pycache__ beside these
files), so only the first run on a machine pays the compile time. numba itself is imported lazily: this
module imports without it, and selecting the backend then says how to install it.
"""
import importlib
import os

import numpy as np

from refimpl.backend import Backend, BackendError

GOMP_SPINCOUNT = "30000"   # spins before an idle OpenMP thread sleeps: ~0.6 ms here (~20 ns each)
INSTALL_HINT = "numba: not installed; install refimpl[numba] (pip install -e '.[numba]')"


class _Kernel:
    """A kernel attribute whose numba module is imported on first use (so numba loads lazily)."""

    def __init__(self, module):
        self.module = module

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.name)


class NumbaBackend(Backend):
    """The numba-CPU backend: the reference's memory model, numba kernels."""

    name = "numba"
    xp = np
    is_gpu = False

    @classmethod
    def check_available(cls) -> None:
        try:
            import numba  # noqa: F401
        except ImportError as exc:
            raise BackendError(INSTALL_HINT) from exc

    def __init__(self):
        self.check_available()
        import numba
        # Simulated ranks are threads that launch parallel kernels concurrently; numba's default fallback
        # layer (workqueue) aborts on that, so ask for a thread-safe one (OpenMP or TBB).
        if numba.config.THREADING_LAYER == "default":
            numba.config.THREADING_LAYER = "threadsafe"
        # OpenMP's threads spin ~5 ms after each parallel region by default, and the spinning starved NumPy's BLAS
        # threads and the other simulated ranks: on 2 cores a forward pass took 47 ms instead of 0.6 ms, a training
        # run 3.8x longer. Fully passive, a sleeping thread takes 50-100 us to wake for the next kernel (a 0.27 ms
        # product took 0.41). So: spin ~0.6 ms (GOMP_SPINCOUNT: the default model's step took 48.4 ms with 10,000
        # spins, 44.3 with 30,000, 44.2 with 100,000), then sleep; libgomp does not spin while it manages more
        # threads than there are cores (simulated ranks). Unless the user chose (read when OpenMP starts: the
        # first parallel call).
        if "OMP_WAIT_POLICY" not in os.environ:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)
        # The same for NumPy's OpenBLAS, whose threads spin after each product: this backend cuts the products
        # into chunks on its own threads, so OpenBLAS gets one thread, for the whole process. Once, not per call:
        # setting the count back up wakes OpenBLAS's threads, and they spin again.
        from refimpl import blas_threads, host_malloc
        blas_threads.pin_threads(1)
        host_malloc.keep_freed()   # no page faults for each step's temporaries (refimpl/host_malloc.py)

    softmax = _Kernel("dense")
    softmax_backward = _Kernel("dense")
    layernorm = _Kernel("dense")
    layernorm_backward = _Kernel("dense")
    gelu = _Kernel("dense")
    gelu_backward = _Kernel("dense")
    embedding = _Kernel("dense")
    embedding_backward = _Kernel("dense")
    cross_entropy = _Kernel("dense")
    cross_entropy_backward = _Kernel("dense")
    matmul = _Kernel("dense")
    add = _Kernel("dense")
    attention = _Kernel("attention")
    attention_backward = _Kernel("attention")
    adam_step = _Kernel("optim")
    sum_squares = _Kernel("optim")
    has_inf_or_nan = _Kernel("optim")
    cast = _Kernel("optim")
    # not in the kernel interface: the host AdamW in lanes, for an update beside the GPU's forward
    # (refimpl/memory/overlapped_update.py uses them when the host backend has them)
    adam_lanes = _Kernel("adam_lanes")
    new_work = _Kernel("adam_lanes")
    pieces_done = _Kernel("adam_lanes")
    lane_count = _Kernel("adam_lanes")

    def warmup(self) -> None:
        """Compile (or load from the disk cache) every kernel once, on tiny float32 and float64 inputs:
        the signatures the wrappers produce (C-contiguous, fixed ndim), so later calls never compile."""
        from ._warmup import warmup
        warmup(self)
