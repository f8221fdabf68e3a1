"""refimpl's numba-CPU backend: every kernel of the interface compiled with numba, parallel with prange.

Registered through the `refimpl.backends` entry point (pyproject.toml), exactly as a third-party backend
would be; select it with REFIMPL_BACKEND=numba or refimpl.use_backend("numba"). Arrays are plain NumPy
arrays (xp = numpy), so everything the backend does not override (memory, matmul) is the reference's.

- dense.py      softmax, layernorm, GELU, embedding, cross-entropy, forward and backward
- attention.py  FlashAttention-2 forward/backward (plain and tiled forms): tile products through NumPy's
                batched BLAS, masks / online softmax / dS fused in numba, parallel over rows
- optim.py      fused single-pass AdamW (+ fp16/bf16 copy-out), sum of squares, inf/nan check, cast
- _bits.py      float16 / bfloat16 bit conversions inside kernels (numba has neither type)
- _vmath.py     float32 exp / tanh that vectorise (numba's np.exp / np.tanh are scalar libm calls)

NumPy's BLAS keeps its own threads (OPENBLAS_NUM_THREADS): on the 2-core benchmark machine the default
(all cores) measured faster for the training step than OPENBLAS_NUM_THREADS=1 (benchmarks/train_step_cpu.py).

matmul stays NumPy's `@` (BLAS), with float16/bfloat16 operands upcast to float32 as the reference does.

Kernels compile once per process and are cached on disk (`cache=True`, in __pycache__ beside these
files), so only the first run on a machine pays the compile time. numba itself is imported lazily: this
module imports without it, and selecting the backend then says how to install it.
"""
import importlib
import os

import numpy as np

from refimpl.backend import Backend, BackendError

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
        # OpenMP's threads spin after each parallel region by default, and the spinning starves NumPy's BLAS
        # threads and the other simulated ranks: on 2 cores a forward pass took 47 ms instead of 0.6 ms, a training
        # run 3.8x longer. Sleep instead, unless the user chose (read when OpenMP starts: the first parallel call).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
